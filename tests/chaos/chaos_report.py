"""The chaos run's report: one row per round and the list of violations."""

from __future__ import annotations

from chaos_plan import INVARIANTS, RoundResult

# --------------------------------------------------------------------------
# report


HEADER = (
    f"{'round':>5} {'cmds':>6}  "
    + " ".join(f"{i:>3}" for i in INVARIANTS)
    + f"  {'time':>7}  {'settle':>6} {'conv':>5} {'exp.lag':>7}  faults; notes"
)


def format_row(r: RoundResult) -> str:
    counts = " ".join(f"{len(r.violations.get(i, ())):>3}" for i in INVARIANTS)
    faults = ", ".join(f.label() for f in r.faults) or "-"
    notes = "".join("; " + n.splitlines()[0] for n in r.notes)
    st = r.stats
    return (
        f"{r.number:>5} {r.commands:>6}  {counts}  {r.seconds:6.1f}s  "
        f"{st.get('settle_s', 0):5.1f}s {st.get('converge_s', 0):4.1f}s "
        f"{st.get('expiry_late_max_s', 0):6.1f}s  {faults}{notes}"
    )


def format_table(results: list[RoundResult]) -> str:
    lines = [
        "cmds: commands sent (re-sends included); I1..I6: new violations; settle: until "
        "every command was answered and the relay caught up; conv: until Redis and "
        "search equalled the table; exp.lag: latest expiry after its deadline",
        HEADER,
        "-" * 100,
    ]
    lines += [format_row(r) for r in results]
    total = {i: sum(len(r.violations.get(i, ())) for r in results) for i in INVARIANTS}
    lines.append(
        f"{'all':>5} {sum(r.commands for r in results):>6}  "
        + " ".join(f"{total[i]:>3}" for i in INVARIANTS)
        + f"  {sum(r.seconds for r in results):6.1f}s"
    )
    return "\n".join(lines)


def violation_report(results: list[RoundResult], limit: int = 20) -> str:
    out = []
    for r in results:
        for inv in INVARIANTS:
            items = r.violations.get(inv, ())
            for item in items[:limit]:
                out.append(f"round {r.number} {inv}: {item}")
            if len(items) > limit:
                out.append(f"round {r.number} {inv}: ... {len(items) - limit} more")
    return "\n".join(out)
