"""Usage ingestion through a Redis Stream: durable, off the hot path, counted once.

The proxy's `UsageStreamProducer` appends each record to the stream in
pipelined batches; while Redis is unreachable it spools them to an fsync'd
local file and replays the file when Redis is back. A Celery task runs
`usage_stream_drain`, which reads the stream through a consumer group, writes
each batch to the ledger (idempotent on the event id), and acknowledges and
deletes the entries only after that commit. A consumer that dies mid-batch
leaves its entries pending; another one claims them once they have been idle
for a while. Delivery is at least once, accounting exactly once.

Only one consumer group reads the stream, so deleting acknowledged entries
(instead of trimming by length) never drops an entry nobody has consumed.
"""

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
import types
import typing
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import orjson
import redis
import redis.asyncio
from django.conf import settings
from django.db import DataError
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff

from billing.contracts import UsageRecord
from billing.ingest import usage_events_write

logger = logging.getLogger(__name__)

USAGE_GROUP = "ledger"
FORMAT_VERSION = 1
ENTRY_FIELD = b"e"  # the one field of a stream entry: the record as JSON
# A batch of records appended by one script call: one command for redis-py to pack
# and one reply to parse, not one per record (a pipeline of XADDs was a visible
# share of a proxy worker's CPU), and all of the batch or none of it.
# The same call writes in-flight entries (billing/inflight.py) and forgets those of the
# records appended: an entry lives until its record is in the stream.
# ARGV: entry count, record count, then (request id, entry) pairs, the records, and the
# request ids whose entries to forget.
_XADD_BATCH_LUA = """
local entries, records, i = tonumber(ARGV[1]), tonumber(ARGV[2]), 3
for _ = 1, entries do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]); i = i + 2 end
for _ = 1, records do redis.call('XADD', KEYS[1], '*', KEYS[2], ARGV[i]); i = i + 1 end
for j = i, #ARGV do redis.call('HDEL', KEYS[3], ARGV[j]) end
return records
"""
_XADD_BATCH_SHA = hashlib.sha1(_XADD_BATCH_LUA.encode()).hexdigest()
SPOOL_SUFFIX = ".jsonl"

# Write-ahead entries of requests in flight, per web process (billing/inflight.py): the
# set of processes writing to a stream, each one's hash (request id -> entry), and the
# key that says it is alive (for TOLLGATE_PROCESS_LIVE_SECONDS, said again well before).
_LIVE_SAID_PER_TTL = 5
BEGIN_FLUSH_S = 0.05  # entries handed to `begin` reach Redis within this


def inflight_producers_key(stream: str) -> str:
    return f"{stream}:inflight"


def inflight_hash_key(stream: str, producer: str) -> str:
    return f"{stream}:inflight:{producer}"


def inflight_live_key(stream: str, producer: str) -> str:
    return f"{stream}:inflight:{producer}:live"


class UsageSink(Protocol):
    """Where the proxy hands usage records: `UsageBuffer` or `UsageStreamProducer`."""

    # Where requests write their in-flight entries (billing/inflight.py); None: nowhere.
    inflight_key: str | None

    def add(self, record: UsageRecord) -> None: ...

    def begin(self, request_id: str, entry: bytes) -> None:
        """A request with no reserve to carry its in-flight entry is calling upstream."""

    @property
    def pending(self) -> int: ...

    async def run(self) -> None: ...

    async def flush(self) -> bool: ...


def dead_letter_stream(stream: str) -> str:
    return f"{stream}:dead"


# ---------------------------------------------------------------- serialisation


class MalformedUsageEntry(ValueError):
    """A stream entry that is not a usage record this version can read."""


def _json_default(value: object) -> object:
    # Containers orjson does not know, should UsageRecord grow such fields.
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def usage_record_encode(record: UsageRecord) -> bytes:
    """The record as versioned JSON: exact ints, ISO datetimes with offset, UUIDs as text.

    Every dataclass field is written, so fields added to UsageRecord later
    travel without a change here.
    """
    payload: dict[str, object] = {"v": FORMAT_VERSION}
    for field in dataclasses.fields(record):
        payload[field.name] = getattr(record, field.name)
    return orjson.dumps(payload, default=_json_default)


def usage_record_decode(fields: Mapping[bytes, bytes]) -> UsageRecord:
    """Read a stream entry back; unknown fields are ignored, missing optional ones defaulted.

    Raises MalformedUsageEntry for anything that cannot be a record: such an
    entry must be set aside, never retried forever.
    """
    raw = fields.get(ENTRY_FIELD)
    if raw is None:
        raise MalformedUsageEntry("no record field")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedUsageEntry(f"not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise MalformedUsageEntry("not a JSON object")
    version = payload.get("v")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        # Newer entries need a newer worker: deploy consumers before producers.
        raise MalformedUsageEntry(f"unknown format version {version!r}")
    return _decode_dataclass(UsageRecord, payload, path="")


@cache
def _fields_of(cls: type) -> tuple[tuple[str, Any, bool, frozenset[type]], ...]:
    """(name, declared type, required, JSON types kept as they are) of each field: worked
    out once per class, as the ingestion worker decodes every event with them."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (
            field.name,
            hints[field.name],
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING,
            _kept_as_is(hints[field.name]),
        )
        for field in dataclasses.fields(cls)
    )


def _kept_as_is(kind: Any) -> frozenset[type]:
    """The exact JSON types a value of `kind` needs no conversion from (`int | None`: int
    and None; a bool is not an int here, as in _decode_value)."""
    origin, args = _shape(kind)
    options = args if origin in (typing.Union, types.UnionType) else (kind,)
    return frozenset(option for option in options if option in (int, str, bool, type(None)))


@cache
def _shape(kind: Any) -> tuple[Any, tuple[Any, ...]]:
    """A type's origin and arguments (`int | None` -> Union, (int, NoneType)), once per type."""
    return typing.get_origin(kind), typing.get_args(kind)


def _decode_dataclass(cls: type, payload: object, *, path: str) -> Any:
    if not isinstance(payload, dict):
        raise MalformedUsageEntry(f"{path or 'record'}: expected an object")
    values = {}
    for name, kind, required, kept_as_is in _fields_of(cls):
        if name in payload:
            value = payload[name]
            # Most fields are ints and strings, optional or not: checked here without
            # a call (this loop is a visible share of the ingestion worker's CPU).
            if type(value) in kept_as_is:
                values[name] = value
            else:
                values[name] = _decode_value(kind, value, path=f"{path}{name}")
        elif required:
            raise MalformedUsageEntry(f"{path}{name}: missing")
    return cls(**values)


def _decode_value(kind: Any, value: object, *, path: str) -> object:
    """Convert one JSON value to the field's declared type, strictly."""
    if kind is int and type(value) is int:  # the commonest case first
        return value
    if kind is str and type(value) is str:
        return value
    origin, args = _shape(kind)
    if origin in (typing.Union, types.UnionType):
        options = args
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            with contextlib.suppress(MalformedUsageEntry):
                return _decode_value(option, value, path=path)
        raise MalformedUsageEntry(f"{path}: {value!r} does not fit {kind}")
    if origin in (tuple, list, frozenset, set):
        if not isinstance(value, list):
            raise MalformedUsageEntry(f"{path}: expected a list")
        items = [arg for arg in args if arg is not Ellipsis]
        item_kind = items[0] if items else Any
        return origin(_decode_value(item_kind, item, path=f"{path}[]") for item in value)
    if origin in (dict, Mapping) or kind in (dict, Mapping):
        if not isinstance(value, dict):
            raise MalformedUsageEntry(f"{path}: expected an object")
        return dict(value)
    if kind is bool:
        if type(value) is not bool:
            raise MalformedUsageEntry(f"{path}: expected true or false")
        return value
    if kind is int:
        if type(value) is not int:  # floats would not be exact, bools are not counts
            raise MalformedUsageEntry(f"{path}: expected an integer")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise MalformedUsageEntry(f"{path}: expected a string")
        return value
    if kind is uuid.UUID:
        try:
            return uuid.UUID(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, AttributeError):
            raise MalformedUsageEntry(f"{path}: expected a UUID") from None
    if kind is datetime:
        try:
            moment = datetime.fromisoformat(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            moment = None
        if moment is None or moment.tzinfo is None:
            raise MalformedUsageEntry(f"{path}: expected an ISO datetime with a time zone")
        return moment
    if dataclasses.is_dataclass(kind):
        return _decode_dataclass(kind, value, path=f"{path}.")  # type: ignore[arg-type]
    return value  # Any, Literal and the like: as JSON gave it


# ---------------------------------------------------------------- producer (web processes)


class _Spool:
    """Append-only local files for records Redis could not take, one file per writer.

    Each file is locked (flock) by the process writing or replaying it; a lock
    held by a dead process is released by the kernel, so its file gets replayed
    by whichever process next finds it. File work runs in threads: fsync must
    never stall the event loop.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()  # one file operation at a time in this process
        self._fd: int | None = None  # this process's current spool file, locked
        self.unsent = 0  # records this process spooled and has not replayed yet

    def append(self, payloads: Sequence[bytes]) -> None:
        """Write the payloads and fsync them; they survive a crash from here on."""
        with self._lock:
            if self._fd is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                name = f"spool-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
                path = self.directory / (name + SPOOL_SUFFIX)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._fd = fd
            data = b"".join(payload + b"\n" for payload in payloads)
            try:
                written = 0
                while written < len(data):
                    written += os.write(self._fd, data[written:])
                os.fsync(self._fd)
            except OSError:
                # A half-written batch stays at the end of this file, where replay
                # skips it; the caller keeps the batch and retries into a new file.
                os.close(self._fd)
                self._fd = None
                raise
            self.unsent += len(payloads)

    def release(self) -> None:
        """Stop writing the current file so it can be replayed (by anyone)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # closing drops the flock
                self._fd = None

    def files(self) -> list[Path]:
        try:
            return sorted(self.directory.glob("spool-*" + SPOOL_SUFFIX))
        except OSError:
            return []

    @staticmethod
    def claim(path: Path) -> int | None:
        """Open and lock `path` for replay, or None if someone else holds it or it is gone."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if os.fstat(fd).st_nlink == 0:  # replayed and removed while we waited
            os.close(fd)
            return None
        return fd

    @staticmethod
    def read_lines(fd: int, offset: int, limit: int) -> tuple[list[bytes], int]:
        """Up to `limit` complete lines from `offset`, and the offset after them."""
        lines: list[bytes] = []
        with os.fdopen(os.dup(fd), "rb") as handle:
            handle.seek(offset)
            while len(lines) < limit:
                line = handle.readline()
                if not line.endswith(b"\n"):
                    if line:  # its writer died mid-write, before dropping the batch from memory
                        logger.warning("Ignoring a torn line at the end of a usage spool file")
                    break
                offset += len(line)
                if line.strip():
                    lines.append(line.rstrip(b"\n"))
        return lines, offset

    @staticmethod
    def remove(path: Path, fd: int) -> None:
        """Delete a replayed file, still under its lock, then unlock it."""
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def usage_stream_async_client(url: str) -> redis.asyncio.Redis:
    """A client for the producer: it fails fast, since a record waiting on Redis is
    only in memory, while a spooled one is safe on disk."""
    return redis.asyncio.Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=5,
        retry=AsyncRetry(ExponentialBackoff(cap=0.1, base=0.01), 1),
    )


class UsageStreamProducer:
    """Appends usage records to the Redis Stream in batches, off the request path.

    `add` is a list append; `run` sends batches with one script call each. When
    Redis fails, the batch goes to the local spool instead and is replayed on a
    later flush. Should the process be killed outright, a record not yet sent is
    lost, but a request admitted on budgets or rate limits left an in-flight entry
    under `producer` (written with its reserve), and any other request calling upstream
    hands its entry to `begin`, written within BEGIN_FLUSH_S. `run` keeps them alive, and
    billing/inflight.py turns them into events once this process is gone.
    """

    def __init__(
        self,
        *,
        client: redis.asyncio.Redis,
        stream: str,
        spool_dir: Path,
        flush_interval_s: float,
        batch_size: int,
        live_s: float = 30.0,
    ) -> None:
        self.client = client
        self.stream = stream
        self._spool = _Spool(spool_dir)
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._pending: list[UsageRecord] = []
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._redis_down = False
        # When to look again for spool files that dead processes left (monotonic).
        self._next_spool_scan = 0.0
        self.producer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.inflight_key = inflight_hash_key(stream, self.producer)
        self._live_s = live_s
        self._live_until = 0.0  # monotonic: when to say again that this process is alive
        self._begun: dict[str, bytes] = {}  # in-flight entries to write: request id -> entry
        self._begin_flush: asyncio.TimerHandle | None = None

    @classmethod
    def from_settings(cls) -> "UsageStreamProducer":
        return cls(
            client=usage_stream_async_client(settings.REDIS_URL),
            stream=settings.TOLLGATE_USAGE_STREAM,
            spool_dir=Path(settings.VAR_DIR) / "usage-spool",
            flush_interval_s=settings.TOLLGATE_USAGE_FLUSH_SECONDS,
            batch_size=settings.TOLLGATE_USAGE_BATCH_SIZE,
            live_s=settings.TOLLGATE_PROCESS_LIVE_SECONDS,
        )

    def add(self, record: UsageRecord) -> None:
        """Queue one record; never blocks and never raises."""
        self._pending.append(record)
        if len(self._pending) >= self._batch_size:
            self._wake.set()

    def begin(self, request_id: str, entry: bytes) -> None:
        """Write `entry` ahead for a request with no reserve, within BEGIN_FLUSH_S."""
        self._begun[request_id] = entry
        if self._begin_flush is None:
            loop = asyncio.get_running_loop()
            self._begin_flush = loop.call_later(BEGIN_FLUSH_S, self._wake.set)

    @property
    def pending(self) -> int:
        """Records neither in Redis nor in the spool yet."""
        return len(self._pending)

    @property
    def spooled(self) -> int:
        """Records this process spooled that are not back in Redis yet."""
        return self._spool.unsent

    async def run(self) -> None:
        """Flush every interval (or when a batch is full) until cancelled."""
        wait_s = min(self._flush_interval_s, self._live_s / _LIVE_SAID_PER_TTL)
        while True:
            try:
                await self._say_alive()
                await self.flush()
            except Exception:
                logger.exception("Flushing usage records failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait_s)
            self._wake.clear()

    async def _say_alive(self) -> None:
        """Keep this process's in-flight entries from being taken for a dead one's."""
        now = time.monotonic()
        if now < self._live_until or self._redis_down:
            return
        self._live_until = now + self._live_s / _LIVE_SAID_PER_TTL
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                live_key = inflight_live_key(self.stream, self.producer)
                pipe.set(live_key, 1, px=int(self._live_s * 1000))
                pipe.sadd(inflight_producers_key(self.stream), self.producer)
                await pipe.execute()
        except _REDIS_FAILURES as exc:
            self._note_redis_down(exc)

    async def flush(self) -> bool:
        """Move the records pending now to Redis, or to the spool if Redis fails.

        Spooled records are replayed first. Returns False only if a batch could
        go nowhere (Redis and the disk both failing); it stays pending.
        """
        async with self._flushing:
            try:
                redis_up = await self._replay_spool()
            except Exception:
                # The spool stays for the next flush; new records need not wait for it.
                logger.exception("Replaying the usage spool failed")
                redis_up = not self._redis_down
            begun = self._begun_to_write()
            if begun and redis_up and not self._pending:
                with contextlib.suppress(*_REDIS_FAILURES):  # insurance only: not retried
                    await self._send((), (), begun)
            # Only what is pending now: records added while a batch is on its way wait
            # for the next flush. Sending them too would, on a busy event loop, chain
            # small batches back to back, each one more script call for Redis and one
            # more transaction for ingestion.
            due = len(self._pending)
            while due > 0:
                batch = self._pending[: min(self._batch_size, due)]
                payloads, ids = self._encode(batch)
                if redis_up:
                    try:
                        await self._send(payloads, ids, begun)
                        begun = []
                    except _REDIS_FAILURES as exc:
                        self._note_redis_down(exc)
                        redis_up = False
                if not redis_up:
                    try:
                        await asyncio.to_thread(self._spool.append, payloads)
                    except OSError:
                        logger.exception(
                            "Redis and the usage spool both failed; %d records kept in memory",
                            len(self._pending),
                        )
                        return False
                del self._pending[: len(batch)]
                due -= len(batch)
            return True

    def _begun_to_write(self) -> list[tuple[str, bytes]]:
        """The entries handed to `begin`, but those whose record is ready to go."""
        if self._begin_flush is not None:
            self._begin_flush.cancel()
            self._begin_flush = None
        begun, self._begun = self._begun, {}
        for record in self._pending:
            begun.pop(record.event_id.hex, None)
        return list(begun.items())

    async def aclose(self) -> None:
        await asyncio.to_thread(self._spool.release)
        await self.client.aclose()

    def _encode(self, batch: Sequence[UsageRecord]) -> tuple[list[bytes], list[str]]:
        """The records' payloads and request ids (a dropped record keeps its in-flight
        entry, which becomes its event once this process is gone)."""
        payloads, ids = [], []
        for record in batch:
            try:
                payloads.append(usage_record_encode(record))
            except TypeError:
                # A programming error in a new field; keeping it would block the queue.
                logger.exception("Usage record %s cannot be serialised; dropped", record.event_id)
            else:
                ids.append(record.event_id.hex)
        return payloads, ids

    async def _send(
        self, payloads: Sequence[bytes], ids: Sequence[str],
        begun: Sequence[tuple[str, bytes]] = (),
    ) -> None:  # fmt: skip
        """Write the `begun` in-flight entries, XADD the payloads and forget the entries of
        `ids`, in one round trip, all or none. Resent whole after a failure whose outcome
        is unknown: the ledger ignores the duplicates."""
        if not payloads and not begun:
            return
        keys_and_args: list[str | bytes | int] = [
            self.stream, ENTRY_FIELD, self.inflight_key, len(begun), len(payloads),
        ]  # fmt: skip
        for request_id, entry in begun:
            keys_and_args += (request_id, entry)
        keys_and_args += (*payloads, *ids)
        try:
            await self.client.evalsha(_XADD_BATCH_SHA, 3, *keys_and_args)
        except redis.exceptions.NoScriptError:  # Redis restarted: EVAL loads the script
            await self.client.eval(_XADD_BATCH_LUA, 3, *keys_and_args)

    def _note_redis_down(self, exc: BaseException) -> None:
        if not self._redis_down:
            self._redis_down = True
            logger.warning("Redis unreachable (%s); spooling usage records to disk", exc)

    async def _replay_spool(self) -> bool:
        """Send spooled records to Redis; False if Redis is (still) down.

        Also replays files left by processes that died. A file is deleted only
        once all of it is in Redis; an interrupted replay starts over, and the
        ledger ignores what it already has.
        """
        now = time.monotonic()
        if self._redis_down:
            # Probe with a cheap command before resending a whole file.
            try:
                await self.client.ping()
            except _REDIS_FAILURES:
                return False
            self._redis_down = False
            logger.warning("Redis is back; usage records go to the stream again")
        elif not self._spool.unsent and now < self._next_spool_scan:
            return True
        self._next_spool_scan = now + _SPOOL_SCAN_SECONDS
        await asyncio.to_thread(self._spool.release)
        replayed = 0
        for path in await asyncio.to_thread(self._spool.files):
            fd = await asyncio.to_thread(self._spool.claim, path)
            if fd is None:
                continue
            try:
                offset = 0
                while True:
                    lines, offset = await asyncio.to_thread(
                        self._spool.read_lines, fd, offset, self._batch_size
                    )
                    if not lines:
                        break
                    await self._send(lines, _request_ids(lines))
                    replayed += len(lines)
            except _REDIS_FAILURES as exc:
                os.close(fd)
                self._note_redis_down(exc)
                return False
            except BaseException:
                os.close(fd)
                raise
            await asyncio.to_thread(self._spool.remove, path, fd)
        self._spool.unsent = 0
        if replayed:
            logger.warning("Replayed %d spooled usage records into the stream", replayed)
        return True


def _request_ids(payloads: Sequence[bytes]) -> list[str]:
    """The request ids of spooled records (a line that does not parse has none)."""
    ids = []
    for payload in payloads:
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            ids.append(orjson.loads(payload)["event_id"].replace("-", ""))
    return ids


# Redis refusing, resetting or timing out; disk errors are not among them.
_REDIS_FAILURES = (redis.RedisError, ConnectionError, asyncio.TimeoutError)
_SPOOL_SCAN_SECONDS = 10.0


# ---------------------------------------------------------------- consumer (Celery worker)


@dataclasses.dataclass
class DrainCounts:
    """What one drain did, in entries."""

    batches: int = 0
    read: int = 0  # entries delivered to this consumer, claimed ones included
    claimed: int = 0  # entries taken over from consumers that stopped
    written: int = 0  # records handed to the ledger (duplicates are ignored there)
    dead: int = 0  # entries unreadable or refused by the database, set aside

    def __iadd__(self, other: "DrainCounts") -> "DrainCounts":
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        return self


def usage_stream_consumer_name() -> str:
    """A name per worker process: a restarted process is a new consumer, and the
    entries its predecessor held are claimed once idle."""
    return f"{socket.gethostname()}:{os.getpid()}"


def usage_stream_client() -> redis.Redis:
    # The socket timeout must outlast the longest blocking read (block_ms).
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=5, socket_timeout=30)


def usage_stream_drain(
    *,
    consumer: str,
    max_batches: int,
    batch_size: int,
    claim_idle_ms: int,
    block_ms: int = 0,
    client: redis.Redis | None = None,
    stream: str | None = None,
) -> DrainCounts:
    """Write up to `max_batches` batches to the ledger, acknowledging each after its commit.

    First this consumer's own unacknowledged entries (an earlier drain that
    failed), then entries idle longer than `claim_idle_ms` at other consumers
    (dead workers), then new ones, waiting up to `block_ms` when there are
    none. A database or Redis error propagates with the batch unacknowledged:
    it is delivered again later and the ledger ignores what it already has.
    """
    own_client = client is None
    client = client or usage_stream_client()
    stream = stream or settings.TOLLGATE_USAGE_STREAM
    counts = DrainCounts()
    phase, claim_cursor = "own", "0-0"
    try:
        while counts.batches < max_batches:
            if phase == "own":
                entries = _read_group(client, stream, consumer, "0", batch_size, None)
                if not entries:
                    phase = "claim"
                    continue
            elif phase == "claim":
                claim_cursor, entries = _claim(
                    client, stream, consumer, claim_idle_ms, claim_cursor, batch_size
                )
                counts.claimed += len(entries)
                if claim_cursor == "0-0":  # the whole pending list was scanned
                    phase = "new"
                if not entries:
                    continue
            else:
                entries = _read_group(client, stream, consumer, ">", batch_size, block_ms or None)
                if not entries:
                    break
            counts += _ingest(client, stream, entries)
    finally:
        if own_client:
            client.close()
    return counts


Entry = tuple[bytes, dict[bytes, bytes]]


def _ensure_group(client: redis.Redis, stream: str) -> None:
    try:
        # From the start of the stream: entries written before the group existed count too.
        client.xgroup_create(stream, USAGE_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _read_group(
    client: redis.Redis, stream: str, consumer: str, start: str, count: int, block_ms: int | None
) -> list[Entry]:
    for _attempt in range(2):
        try:
            reply = client.xreadgroup(
                USAGE_GROUP, consumer, {stream: start}, count=count, block=block_ms
            )
        except redis.ResponseError as exc:
            # The group (or the whole stream) is created on first use and
            # again if Redis lost it.
            if "NOGROUP" not in str(exc):
                raise
            _ensure_group(client, stream)
            continue
        return list(reply[0][1]) if reply else []
    return []


def _claim(
    client: redis.Redis, stream: str, consumer: str, idle_ms: int, cursor: str, count: int
) -> tuple[str, list[Entry]]:
    try:
        reply = client.xautoclaim(stream, USAGE_GROUP, consumer, idle_ms, cursor, count=count)
    except redis.ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        _ensure_group(client, stream)
        return "0-0", []
    next_cursor = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
    # Entries deleted while pending come back as (None, None) before Redis 7.
    return next_cursor, [entry for entry in reply[1] if entry[0] is not None]


_DeadLetter = tuple[bytes, dict[bytes, bytes], str]  # entry id, its fields, why


def _ingest(client: redis.Redis, stream: str, entries: Sequence[Entry]) -> DrainCounts:
    """Write one batch, then dead-letter, acknowledge and delete it in one MULTI."""
    batch: dict[uuid.UUID, tuple[UsageRecord, bytes, dict[bytes, bytes]]] = {}
    dead: list[_DeadLetter] = []
    for entry_id, fields in entries:
        if not fields:
            continue  # deleted while pending: nothing left but the ack
        try:
            record = usage_record_decode(fields)
        except MalformedUsageEntry as exc:
            logger.error("Malformed usage entry %s moved to the dead letters: %s", entry_id, exc)
            dead.append((entry_id, fields, str(exc)))
            continue
        batch[record.event_id] = (record, entry_id, fields)  # a replayed duplicate: once
    refused = _write(list(batch.values()))
    ids = [entry_id for entry_id, _fields in entries]
    # Only now, after the commit: a crash before this point redelivers the batch.
    pipe = client.pipeline(transaction=True)
    for entry_id, fields, reason in [*dead, *refused]:
        pipe.xadd(
            dead_letter_stream(stream),
            {**fields, b"dead_entry_id": entry_id, b"dead_reason": reason.encode()},
        )
    pipe.xack(stream, USAGE_GROUP, *ids)
    pipe.xdel(stream, *ids)
    pipe.execute()
    return DrainCounts(
        batches=1,
        read=len(entries),
        written=len(batch) - len(refused),
        dead=len(dead) + len(refused),
    )


def _write(batch: Sequence[tuple[UsageRecord, bytes, dict[bytes, bytes]]]) -> list[_DeadLetter]:
    """Write the records; return those the database refused as data, to dead-letter.

    One refused value (say a count beyond its column's range) would fail the
    whole batch forever, so the batch is then written record by record to set
    it aside. Connection errors propagate: the batch is delivered again later.
    """
    try:
        usage_events_write([record for record, _id, _fields in batch])
        return []
    except DataError:
        logger.warning("A usage batch was refused as data; writing it record by record")
    refused: list[_DeadLetter] = []
    for record, entry_id, fields in batch:
        try:
            usage_events_write([record])
        except DataError as exc:
            logger.error("Usage entry %s refused by the database: %s", entry_id, exc)
            refused.append((entry_id, fields, f"refused by the database: {exc}"))
    return refused


_FORGET_IDLE_CONSUMERS = """
local removed = 0
for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local consumer = {}
  for i = 1, #info, 2 do consumer[info[i]] = info[i + 1] end
  if consumer['pending'] == 0 and consumer['idle'] > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], consumer['name'])
    removed = removed + 1
  end
end
return removed
"""


def usage_stream_forget_idle_consumers(
    *, idle_ms: int, client: redis.Redis | None = None, stream: str | None = None
) -> int:
    """Remove consumers (worker processes long gone) that hold no entries; returns how many.

    Atomic in Lua: a consumer holding entries is never removed, since that
    would orphan them.
    """
    own_client = client is None
    client = client or usage_stream_client()
    stream = stream or settings.TOLLGATE_USAGE_STREAM
    try:
        forget = client.register_script(_FORGET_IDLE_CONSUMERS)  # EVALSHA, loaded once
        return int(forget(keys=[stream], args=[USAGE_GROUP, idle_ms]))
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower() or "NOGROUP" in str(exc):
            return 0
        raise
    finally:
        if own_client:
            client.close()
