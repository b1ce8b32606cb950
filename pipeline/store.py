"""Local RocksDB (rocksdict) state of the ledger partitions: a cache of the changelog, never ahead.

One database per ledger partition, ``{datadir}/ledger/stock-{partition}.db``,
holding the keys of the ledger's changelogs (``<sku>`` -> StoredStock,
``<sku>\\0r\\0<order>`` -> StoredReservation) plus one meta key with the next
offset to read of each changelog. The engine writes a batch here only after its
Kafka transaction committed, in one ``WriteBatch`` together with those offsets, so
the files never hold a change the changelogs lack: a worker killed with SIGKILL
restarts warm, reading only the records after those offsets (the records of the
last batches, or of another worker that owned the partition meanwhile).

A write is atomic (RocksDB's WriteBatch with its write-ahead log), so the data
and the offset always agree, also after a crash.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import rocksdict

META_KEY = b"\x00meta"  # never a SKU (no control bytes) nor a reservation key
EVENT_PREFIX = b"\x00e\x00"  # applied event ids (tables.stock.event_key): they sort first
AFTER_EVENTS = b"\x00e\x01"


class PartitionStore:
    """One partition's RocksDB: get, one atomic batch write, a scan."""

    def __init__(
        self, path: Path, options: dict[str, Any] | None = None, default_topic: str = ""
    ) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = rocksdict.Rdict(str(path), options=_options(options or {}))
        raw = self._db.get(META_KEY)
        meta = orjson.loads(raw) if raw is not None else {}
        nxt = meta.get("next", {})
        # one offset: written before the reservations had a changelog of their own
        self.positions: dict[str, int] = (
            {default_topic: int(nxt)}
            if isinstance(nxt, int)
            else {t: int(o) for t, o in nxt.items()}
        )

    def position(self, topic: str) -> int:
        """The next offset of changelog ``topic`` not yet in this store."""
        return self.positions.get(topic, 0)

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._db.get(key)
        return value

    def write(
        self,
        puts: Iterable[tuple[bytes, bytes]],
        positions: dict[str, int],
        deletes: Iterable[bytes] = (),
    ) -> None:
        """Store ``puts``, drop ``deletes`` and store the changelogs' next offsets to read,
        atomically."""
        wb = rocksdict.WriteBatch(raw_mode=True)
        for key in deletes:
            wb.delete(key)
        for key, value in puts:
            wb.put(key, value)
        merged = self._put_meta(wb, positions)
        self._db.write(wb)
        self.positions = merged

    def write_raw(self, topic: str, records: list[tuple[bytes, bytes | None, int]]) -> None:
        """Store records of changelog ``topic`` as read (``None`` value: a tombstone) and
        the offset after the last, atomically."""
        wb = rocksdict.WriteBatch(raw_mode=True)
        for key, value, _offset in records:
            if key is None or key == META_KEY:
                continue
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        merged = self._put_meta(wb, {topic: records[-1][2] + 1})
        self._db.write(wb)
        self.positions = merged

    def _put_meta(self, wb: Any, positions: dict[str, int]) -> dict[str, int]:
        merged = dict(self.positions)
        merged.update(positions)
        wb.put(META_KEY, orjson.dumps({"next": merged}))
        return merged

    def flush(self) -> None:
        """Write the memtables out to SST files (their memory is released)."""
        self._db.flush(True)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) but the meta key and the applied event ids."""
        for key, value in self._db.items(from_key=AFTER_EVENTS):
            if key != META_KEY:
                yield key, value

    def expired_events(
        self, start: bytes, before: int, limit: int
    ) -> tuple[list[bytes], bytes | None]:
        """Event-id keys from ``start`` on applied before ``before`` (ms), scanning at most
        ``limit`` keys; and the key to go on from (None: the scan reached the end)."""
        expired: list[bytes] = []
        seen = 0
        for key, value in self._db.items(from_key=start):
            if not key.startswith(EVENT_PREFIX):
                return expired, None
            if seen >= limit:
                return expired, key
            seen += 1
            if orjson.loads(value)["at"] < before:
                expired.append(key)
        return expired, None

    def scan(self, start: bytes, limit: int) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        """Up to ``limit`` (key, value) pairs of :meth:`items` from ``start`` on, and the
        key to go on from (None: the scan reached the end)."""
        found: list[tuple[bytes, bytes]] = []
        for key, value in self._db.items(from_key=max(start, AFTER_EVENTS)):
            if key == META_KEY:
                continue
            if len(found) >= limit:
                return found, key
            found.append((key, value))
        return found, None

    def event_count(self) -> int:
        """Applied event ids held (a scan: for tests and the bench)."""
        n = 0
        for key in self._db.keys(from_key=EVENT_PREFIX):
            if not key.startswith(EVENT_PREFIX):
                break
            n += 1
        return n

    def close(self) -> None:
        self._db.close()

    def destroy(self) -> None:
        """Close and delete the files (a cold restore follows)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self.positions = {}


def _options(cfg: dict[str, Any]) -> rocksdict.Options:
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    mib = 1024 * 1024
    opts.set_write_buffer_size(int(cfg.get("write_buffer_mb", 8)) * mib)
    opts.set_max_write_buffer_number(int(cfg.get("max_write_buffers", 2)))
    opts.set_max_open_files(int(cfg.get("max_open_files", 300)))
    table = rocksdict.BlockBasedOptions()
    table.set_bloom_filter(10, block_based=True)
    table.set_block_cache(rocksdict.Cache(int(cfg.get("block_cache_mb", 8)) * mib))
    opts.set_block_based_table_factory(table)
    return opts


def store_path(datadir: Path, partition: int) -> Path:
    return Path(datadir) / "ledger" / f"stock-{partition}.db"
