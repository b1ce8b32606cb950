"""constraints.txt pins every dependency of setup.cfg, at versions its ranges accept,
and every pip install of make and the Dockerfile uses it (.ci/run runs make)."""

from __future__ import annotations

import configparser
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from unit.deploy_checks import dockerfile_instructions

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "constraints.txt"


def declared() -> list[Requirement]:
    """install_requires and every extra of setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in cfg["options.extras_require"].values():
        lines += extra.splitlines()
    return [Requirement(line) for line in lines if line.strip()]


def declared_of(*sections: str) -> list[Requirement]:
    """The requirements of install_requires and/or the named extras."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines: list[str] = []
    for section in sections:
        if section == "install_requires":
            lines += cfg["options"]["install_requires"].splitlines()
        else:
            lines += cfg["options.extras_require"][section].splitlines()
    return [Requirement(line) for line in lines if line.strip()]


def pins(text: str) -> dict[str, Version]:
    out: dict[str, Version] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert m, f"not an exact pin: {raw!r}"
        name = canonicalize_name(m.group(1))
        assert name not in out, f"{name} pinned twice"
        out[name] = Version(m.group(2))
    return out


def unpinned(requirements: list[Requirement], pinned: dict[str, Version]) -> list[str]:
    problems = []
    for req in requirements:
        name = canonicalize_name(req.name)
        if name not in pinned:
            problems.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(pinned[name], prereleases=True):
            problems.append(f"{req.name}=={pinned[name]} is outside {req.specifier}")
        for extra in req.extras:  # e.g. faust-streaming[rocksdict]: its extra's packages too
            # only an installed package tells its extras' requirements: `make test` installs
            # the test extra, not the bench one (psycopg[binary] there)
            for dep in _requires(req.name):
                dep_req = Requirement(dep)
                if dep_req.marker and dep_req.marker.evaluate({"extra": extra}):
                    problems += unpinned([Requirement(str(dep_req).split(";")[0])], pinned)
    return problems


def _requires(name: str) -> list[str]:
    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return []


def _installed(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def test_every_declared_dependency_is_pinned_within_its_range():
    requirements = declared()
    assert len(requirements) >= 15
    assert unpinned(requirements, pins(CONSTRAINTS.read_text())) == []


def test_a_missing_or_out_of_range_pin_is_caught():
    pinned = pins(CONSTRAINTS.read_text())
    del pinned["redis"]
    pinned["fastavro"] = Version("2.0")
    assert unpinned(declared(), pinned) == [
        "redis is not pinned",
        "fastavro==2.0 is outside <2,>=1.9",
    ]


def test_the_pins_are_what_this_venv_runs_and_the_project_is_not_pinned():
    pinned = pins(CONSTRAINTS.read_text())
    assert "inventory-pipeline" not in pinned
    assert "pip" in pinned  # make upgrades pip to this version, not to the newest
    # every installed pin matches; what is not installed here (the bench extra's packages
    # after a plain `make test`) cannot differ from it
    installed = {name: _installed(name) for name in pinned}
    differ = {
        name: (str(version), str(installed[name]))
        for name, version in pinned.items()
        if installed[name] is not None and installed[name] != version
    }
    assert differ == {}, f"pinned vs installed (run make venv, or make constraints): {differ}"
    # and everything `make test` installs (the project and its test extra) is pinned and here
    for req in declared_of("install_requires", "test"):
        assert installed.get(canonicalize_name(req.name)) is not None, f"{req.name} missing"


def test_every_pip_install_of_make_and_the_dockerfile_uses_the_constraints():
    make = (REPO / "Makefile").read_text()
    constraints_flag = re.search(r"^CONSTRAINTS := (.+)$", make, re.M)
    assert constraints_flag and constraints_flag.group(1) == "-c constraints.txt"
    installs = [
        line for line in make.splitlines() if "pip install" in line and not line.startswith("#")
    ]
    assert len(installs) >= 3, installs  # pip itself, the venv, the bench extras
    for line in installs:
        assert "$(CONSTRAINTS)" in line, line
    # the venv is rebuilt when the constraints change
    assert re.search(r"^\$\(VENV\)/\.installed:.*\bconstraints\.txt\b", make, re.M)

    instructions = dockerfile_instructions()
    copied = " ".join(a for i, a in instructions if i == "COPY")
    assert "constraints.txt" in copied.split()
    runs = [a for i, a in instructions if i == "RUN" and "pip install" in a]
    assert runs
    for run in runs:
        assert "-c constraints.txt" in run, run
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install" not in ci and "make test" in ci  # CI installs through make
