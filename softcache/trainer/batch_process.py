"""A layout's batches made in a child process and handed to the training loop in shared memory.

A batch thread (`softcache.trainer.ahead.Ahead`) takes the loader's work off the training thread but
not off its interpreter: the two share the GIL. A training step is hundreds of short torch calls,
each of which releases the GIL and takes it back; whenever the batch thread holds it then (collating
inputs, zarr's read path, the teacher targets' small ops), the step waits. Measured on the fast
student of `benchmarks/train.py` (2 cores, `python -m benchmarks.loader_contention`): an epoch of
its steps took 149 ms alone, 297-304 ms beside a batch thread running a loader without pause, and
161-170 ms beside the same loader in another process. A GPU student's step is almost all such
calls.

So by default (`TrainConfig.loader = "process"`) the training loop's batches are made by a child
process that builds the same layout from the same config and runs `layout.batches` there (any
`BatchSource` can run so: `AlignedBatches(..., batch_process=True)` runs its own epochs): input
collation, the alignment check's hashing, the store reads, the gather and the teacher targets all
leave the training process. Each batch crosses in shared memory: the child writes every tensor and
array of the batch into one of `depth + 2` slots (shared uint8 tensors, grown when a batch does not
fit) and sends a small pickle whose tensors are references into the slot; the parent rebuilds the
batch as views of the slot (one `as_strided` per tensor). The parent counts a batch done, in a
shared counter the child reads before it reuses the slot (batch n lives in slot n % slots), once
nothing holds a view of its slot any more: the slot's storage is back to the parent's own
references and its byte array to its own (one C call each, when the next batch is asked for). So
the hand-off sends no message back and wakes nobody, and a batch stays valid for as long as its
consumer holds it, as a DataLoader's would: a loop that keeps the batch it just used while it asks
for the next one (the loop variable does, until it is rebound), a wrapper that fetches one batch
ahead (accelerate's loaders do), or a list of a whole epoch. Batches are counted done in order; the
extra slot covers the batch the loop variable holds. Where every slot is held, the parent gives up
the oldest one to its holder and tells the child to make that slot anew (its memory is freed when
the holder lets it go), so holding batches costs memory, never a stall. It costs the training
thread 77-85 us per ready batch after an 8.5 ms CPU step, against 66-77 us for the batch thread's
queue (a message and a wake-up per freed slot made it 214-235 us); counting the held batches adds
15-19 us (after the fast student's 4 ms step of `benchmarks/train.py`: cold caches, as every
call there).
On CUDA the slots are page-locked in the parent (`cudaHostRegister`), so copies to the device can
be asynchronous as with a pinned DataLoader; a batch let go frees its slot only once an event
recorded on the current stream after that has passed, since its copies may not have read it yet.

The child starts an epoch when it is asked for, unless it was told of it with the epoch before
(`batches(after=NextEpoch(...))`, which the training loop does): then it starts it as soon as the
one before is made, and that epoch's first batches are waiting when the loop asks. Otherwise each
epoch's first batch waits for the child to set the epoch up (its DataLoader iterator, whose
workers start per epoch, the first collation, the first teacher targets): 2.7-3.2 ms hard and
3.6-4.8 ms offline in a 240-290 ms epoch of the fast student of `benchmarks/train.py`, 0.2-0.3 ms
with the epoch queued. A call that asks for anything else drops the queued epoch, unused.

The batches are those the thread path makes, bit for bit: the same layout code runs on the same
config, in the same order, and nothing in it draws from torch's global RNG.

The child starts from multiprocessing's fork server (which imports torch and softcache once per
parent process, so a child costs a fork, not an interpreter start) without re-importing the
parent's `__main__` (a script without a main guard would run again in it); what it is sent may
therefore not be defined there, which is refused before the child starts. Where a child cannot be
made (no fork server on this platform, a config that does not pickle, a spec the child cannot
resolve) the loop warns and uses the batch thread; `loader = "thread"` asks for it. The price of a
child: the dataset and the store are opened twice (the parent's layout still computes losses and
evaluates). A dataset made from a spec is made again in the child, so an in-memory one is held
twice; a dataset given as an object crosses pickled, its torch tensors moved to shared memory and
mapped by the child (held once), anything else in it copied.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import pickle
import select
import signal
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable, Generator, Iterator
from multiprocessing import connection, spawn
from multiprocessing.reduction import ForkingPickler
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.multiprocessing  # registers the reductions that share tensors' memory

from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import plan_from_state

# Offsets of tensors in a slot are aligned to this many bytes (any dtype's view is then aligned).
_ALIGN = 64
# A grown slot gets this much headroom, so batches of slowly varying size (token batches padded
# to their longest sequence) do not grow it every time.
_GROWTH = 1.25
# What the fork server imports once, so that a child costs a fork rather than these imports.
_PRELOAD = (
    __name__,
    "softcache.trainer.layout_process",
    "softcache.trainer.rows",
    "softcache.trainer.tokens",
)
# Seconds between checks that the child is alive while waiting for it.
_POLL = 1.0
# A storage's count of tensors (and other owners) that refer to it: how the parent sees that
# nothing holds a view of a slot any more. Private to torch; without it, a batch is counted done
# when the one after it is asked for (a consumer that holds it longer must copy it).
_storage_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)
# Batches held past their turn (each with a slot of its own) at which the parent warns, each time
# their number climbs to it: memory that grows with every batch is more often a leak than a plan.
_HELD_WARNING = 64
# Seconds the child sleeps (on its command pipe) between checks for a free slot: it is ahead of
# the loop then, by `depth` batches, and refills every freed slot when it wakes: only steps under
# ~0.1 ms (a quarter of this, at the default depth of 4) could drain its lead.
_SLOT_WAIT = 0.0005


class BatchProcessError(RuntimeError):
    """The batch process died, or could not be started."""


class NextEpoch(NamedTuple):
    """The epoch a caller of `BatchProcess.batches` will ask for after this one (`after`)."""

    plan: EpochPlan
    steps: int
    hash_stride: int
    then: EpochPlan | None


def _epoch_command(
    plan: EpochPlan, steps: int, hash_stride: int, then: EpochPlan | None
) -> tuple[Any, ...]:
    """The child's command for an epoch: plain values, so two commands compare equal exactly
    when they ask for the same batches."""
    then_state = None if then is None else then.state_dict()
    return ("epoch", plan.state_dict(), steps, hash_stride, then_state)


class BatchSource(Protocol):
    """What a batch process runs: a layout, or anything that makes an epoch's batches alike."""

    def batches(
        self, plan: EpochPlan, steps: int, *, hash_stride: int, then: EpochPlan | None
    ) -> Iterator[Any]:
        """The plan's batches of its current epoch, from its cursor: at most `steps`."""
        ...


class BatchProcess:
    """A batch source's batches, made in a child process (see the module docstring).

    Args:
        source: a picklable callable the child calls once to build its `BatchSource` (which
            then makes every epoch's batches); its arguments cross pickled, with torch tensors
            moved to shared memory.
        device: where the student runs: on CUDA the slots are page-locked for asynchronous
            copies; the child never touches the device.
        depth: batches the child makes ahead of the one in use.

    Raises:
        BatchProcessError: this platform has no fork server; `source` does not pickle, or
            refers to something defined in the script being run (`__main__`), which the child
            does not import.
    """

    def __init__(
        self, source: Callable[[], BatchSource], device: torch.device, *, depth: int = 4
    ) -> None:
        self.device = device
        # depth ahead, the batch in use, and the one before it, which the loop variable still
        # holds when the next is asked for.
        self._count = depth + 2
        self._slots: dict[int, _ParentSlot] = {}
        # Slots given up to a consumer that held them (`_give_up`), freed once it lets go.
        self._given_up: list[_ParentSlot] = []
        self._ready = False
        # The epoch command sent ahead (`batches(after=...)`), which the child runs next.
        self._queued: tuple[Any, ...] | None = None
        if "forkserver" not in multiprocessing.get_all_start_methods():
            raise BatchProcessError("this platform has no fork server")
        args = _pickled((source, self._count, dict(os.environ), _start_method()))
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(_PRELOAD))
        commands, self._commands = context.Pipe(duplex=False)
        self._results, results = context.Pipe(duplex=False)
        # Batches received, and the count of those nothing holds any more (in order), shared
        # with the child: it reuses a slot once its batch is done, without a message (and a
        # wake-up) per batch. Batch n lives in slot n % slots.
        self._received = 0
        self._consumed = context.RawValue("q", 0)
        self._done = 0  # its value, read here without ctypes
        self._poller = select.poll()
        self._poller.register(self._results.fileno(), select.POLLIN)
        self._process = context.Process(
            target=_serve, args=(args, commands, results, self._consumed), name="softcache-batches"
        )
        with _without_main():
            self._process.start()
        commands.close()  # the child's ends: closing ours lets EOF reach the other side
        results.close()
        self._finalizer = weakref.finalize(self, _shutdown, self._process, self._commands)

    def wait_ready(self) -> None:
        """Wait until the child has built its layout.

        Raises:
            BatchProcessError: the child failed to build it (with the child's error) or died.
        """
        if self._ready:
            return
        message = self._receive()
        if message[0] == "error":
            raise BatchProcessError(
                f"the batch process could not build the layout:\n{message[2]}"
            ) from message[1]
        assert message[0] == "ready", message
        self._ready = True

    def batches(
        self,
        plan: EpochPlan,
        steps: int,
        *,
        hash_stride: int,
        then: EpochPlan | None,
        after: NextEpoch | None = None,
    ) -> Generator[Any, None, None]:
        """The epoch's batches, as `layout.batches(plan, steps, ...)` makes them.

        Each batch's tensors and arrays are views of shared memory, valid as long as anything
        holds them (or a view of them); holding many costs a slot's memory each, not a stall.
        What holds no tensor is not seen: a raw `data_ptr()` handed to code that reads later,
        or (CUDA) an asynchronous copy on a stream other than the current one once the batch
        is let go; synchronise such a copy, or `.clone()` first.
        Closing the iterator early stops the child's epoch (its stream's threads stop).

        Args:
            plan, steps, hash_stride, then: as `BatchSource.batches`.
            after: the epoch the caller will ask for next, if it knows it: the child starts it
                as soon as this one is made, so that epoch's first batches are ready when it
                is asked for (its first batch no longer waits for the child to set the epoch
                up: the DataLoader iterator and its workers, the first reads, the first
                collation). A next call with other arguments drops it, unused.

        Raises:
            Whatever the layout raised in the child (`DatasetMismatchError`, ...), at the batch
            where it happened; BatchProcessError if the child died.
        """
        self.wait_ready()
        command = _epoch_command(plan, steps, hash_stride, then)
        if self._queued is not None and self._queued != command:
            self._stop_epoch()  # the epoch started ahead is not this one: drop it
        if self._queued == command:
            self._queued = None  # already under way in the child
        else:
            self._send(command)
        if after is not None:
            self._queued = _epoch_command(*after)
            self._send(self._queued)
        finished = False
        try:
            while True:
                if self._received - self._done >= self._count:
                    # Every slot holds a batch still in use: the child cannot make the next.
                    self._give_up(self._done)
                message = self._receive()
                kind = message[0]
                if kind == "slot":
                    self._replace_slot(message[1], message[2])
                elif kind == "batch":
                    batch = self._unpack(message[1], message[2])
                    self._received += 1
                    yield batch
                    del batch
                    # Asked for the next batch: count done those no longer held, but for this
                    # one, which the caller's loop variable holds until this call returns.
                    self._count_done(self._received - 1)
                elif kind == "done":
                    finished = True
                    return
                elif kind == "error":
                    finished = True
                    raise _child_error(message[1], message[2])
        finally:
            if not finished:
                self._stop_epoch()

    def close(self) -> None:
        """Stop the child and release the slots (idempotent). Batches still held keep their
        memory (not page-locked any more) until they go."""
        slots = [*self._slots.values(), *self._given_up]
        if any(held.registered is not None for held in slots):
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()  # no copy still reads from memory about to be unlocked
        for held in slots:
            held.unregister()
        self._slots.clear()
        self._given_up.clear()
        self._finalizer()
        self._results.close()

    # -- the parent's side of the protocol

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._commands.send(message)
        except (BrokenPipeError, OSError) as exc:
            raise self._died() from exc

    def _receive(self) -> tuple[Any, ...]:
        # One poll object for the run: `Connection.poll` builds a selector per call, which was
        # a third of the hand-off's cost per batch.
        while not self._poller.poll(_POLL * 1000):
            if not self._process.is_alive():
                raise self._died()
        try:
            message: tuple[Any, ...] = self._results.recv()
        except (EOFError, OSError) as exc:  # OSError: reset by a child that was killed
            raise self._died() from exc
        return message

    def _died(self) -> BatchProcessError:
        self._process.join(timeout=5)
        return BatchProcessError(
            f"the batch process exited (code {self._process.exitcode}) while making batches; "
            "make them in this process, where its error shows, to see why (`softcache train "
            "--loader thread`; `AlignedBatches(..., batch_process=False)`)"
        )

    def _stop_epoch(self) -> None:
        """Tell the child to drop the rest of the epoch, and the epoch queued after it; read
        what it sent until it says so."""
        self._queued = None
        try:
            self._send(("stop",))
            while (message := self._receive())[0] != "stopped":
                if message[0] == "slot":
                    self._replace_slot(message[1], message[2])
                elif message[0] == "batch":
                    self._received += 1  # made before the stop: dropped
            self._count_done(self._received)
        except BatchProcessError:
            pass  # a dead child has no epoch to stop; the next call says it died

    def _count_done(self, upto: int) -> None:
        """Advance the shared count over the batches before `upto`, in order, whose slots
        nothing holds any more; free the given-up slots whose holders let them go."""
        done = self._done
        while done < upto and self._slots[done % self._count].free():
            done += 1
        if done != self._done:
            self._done = self._consumed.value = done
        if self._given_up:
            for held in [held for held in self._given_up if held.free()]:
                held.unregister()
                self._given_up.remove(held)

    def _give_up(self, batch: int) -> None:
        """Leave batch `batch`'s slot to whatever holds it, and have the child make the slot
        anew: the message goes before the count moves, so the child sees it first. A slot only
        its copies to the GPU still read from is waited for instead."""
        slot = batch % self._count
        if not self._slots[slot].held():
            self._slots[slot].wait()
        else:
            self._send(("renew", slot))
            self._given_up.append(self._slots.pop(slot))
            self._done = self._consumed.value = batch + 1
            if len(self._given_up) == _HELD_WARNING:
                mib = sum(held.tensor.numel() for held in self._given_up) / 2**20
                warnings.warn(
                    f"{_HELD_WARNING} batches from the batch process are still held, each in "
                    f"shared memory of its own ({mib:.0f} MiB in all); if that is not meant, "
                    "look for what keeps them (a list, a logged tensor, an autograd graph) or "
                    "copy what you keep (.clone())",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self._count_done(self._received)

    def _replace_slot(self, slot: int, tensor: torch.Tensor) -> None:
        old = self._slots.get(slot)
        if old is not None:  # grown: its batch is done with
            old.unregister()
        self._slots[slot] = _ParentSlot(tensor, cuda=self.device.type == "cuda")

    def _unpack(self, slot: int, payload: bytes) -> Any:
        held = self._slots[slot]
        held.fence = None  # a new batch: its copies are not enqueued yet
        return _SlotUnpickler(io.BytesIO(payload), held.typed, held.array).load()


class _ParentSlot:
    """The parent's side of one slot: the shared tensor, its views by dtype, and whether its
    batch is done with.

    Held means some tensor refers to the slot's storage, or some array to its byte array,
    besides the parent's own: counts kept from when the parent made each of its own. On CUDA a
    batch no longer held may still be read by the asynchronous copies made of it: the slot is
    free once an event recorded on the current stream after that has passed (the consumer's
    copies were enqueued before it let the batch go), as torch's pinned-memory allocator does.
    """

    def __init__(self, tensor: torch.Tensor, *, cuda: bool) -> None:
        self.tensor = tensor
        self.storage = tensor.untyped_storage()
        self._cdata = self.storage._cdata  # what torch's count takes (valid while it lives)
        self.array = tensor.numpy()
        self._typed: dict[torch.dtype, torch.Tensor] = {}
        self._own_tensors = self._tensor_refs()
        self._own_arrays = sys.getrefcount(self.array)
        self.cuda = cuda and torch.cuda.is_available()  # else no copy to a GPU reads it
        self.fence: Any = None  # torch.cuda.Event recorded once the batch was let go (CUDA)
        self.registered: int | None = None  # page-locked address (CUDA)
        if self.cuda:
            self._register()

    def free(self) -> bool:
        """Whether the slot's batch is done with: not held, and (CUDA) its copies are done."""
        if self.held():
            return False
        if not self.cuda:
            return True
        if self.fence is None:
            self.fence = torch.cuda.Event()
            self.fence.record()
        return bool(self.fence.query())

    def wait(self) -> None:
        """Wait until a slot no longer held is free (CUDA: its copies are done)."""
        if self.cuda and not self.free():
            self.fence.synchronize()

    def held(self) -> bool:
        """Whether a view of the slot is held outside the parent (False without torch's count:
        then a batch is done when the one after it is asked for)."""
        count = _storage_use_count
        return count is not None and (
            count(self._cdata) > self._own_tensors or sys.getrefcount(self.array) > self._own_arrays
        )

    def typed(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole slot as a 1-D tensor of `dtype` (made once per dtype)."""
        view = self._typed.get(dtype)
        if view is None:
            # Counted as the parent's own; the batch being unpacked may hold views already.
            before = self._tensor_refs()
            view = self._typed[dtype] = self.tensor.view(dtype)
            self._own_tensors += self._tensor_refs() - before
        return view

    def _tensor_refs(self) -> int:
        return 0 if _storage_use_count is None else _storage_use_count(self._cdata)

    def _register(self) -> None:
        """Page-lock the slot for asynchronous copies to the GPU (best effort: pageable if not)."""
        with contextlib.suppress(Exception):
            address = self.tensor.data_ptr()
            error = torch.cuda.cudart().cudaHostRegister(address, self.tensor.numel(), 0)
            if int(error) == 0:  # cudaSuccess
                self.registered = address

    def unregister(self) -> None:
        """Undo `_register` (idempotent)."""
        address, self.registered = self.registered, None
        if address is not None:
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(address)


def _child_error(exc: BaseException | None, text: str) -> BaseException:
    """The child's exception, to raise in the parent (its traceback text attached)."""
    if exc is None:
        return BatchProcessError(f"the batch process failed:\n{text}")
    exc.add_note(f"(raised in the batch process)\n{text}")
    return exc


# -- the child


def _pickled(args: tuple[Any, ...]) -> bytes:
    """`args` pickled for the child, refused if they need the parent's `__main__`.

    multiprocessing's pickler, with torch's reductions: the tensors of a dataset given as an
    object move to shared memory and the child maps them, rather than a copy. The child does not
    import the script being run (see `_without_main`), so a class or function defined there
    would not unpickle in it: that is said here, before a child is started.

    Raises:
        BatchProcessError: `args` do not pickle, or refer to `__main__`.
    """
    buffer = io.BytesIO()
    pickler = _MainRefusingPickler(buffer)
    try:
        pickler.dump(args)
    except _DefinedInMain as exc:
        raise BatchProcessError(
            f"{exc} is defined in the script being run (__main__), which the batch process does "
            "not import; define it in a module of its own and import it from there"
        ) from None
    except Exception as exc:
        raise BatchProcessError(f"what the batch process needs does not pickle: {exc}") from exc
    return buffer.getvalue()


class _DefinedInMain(Exception):
    """A pickled object's class or function lives in `__main__` (its qualified name)."""


class _MainRefusingPickler(ForkingPickler):
    """`ForkingPickler` that raises `_DefinedInMain` at anything that `__main__` defines."""

    def reducer_override(self, obj: Any) -> Any:
        # A class or function is pickled by name; an instance by its class's name.
        named = isinstance(obj, type) or (callable(obj) and hasattr(obj, "__qualname__"))
        kind = obj if named else type(obj)
        if getattr(kind, "__module__", None) == "__main__":
            raise _DefinedInMain(getattr(kind, "__qualname__", repr(kind)))
        return NotImplemented


def _serve(
    args: bytes, commands: connection.Connection, results: connection.Connection, consumed: Any
) -> None:
    """The child's main loop: build its batch source, then make epochs of batches on request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    torch.set_num_threads(1)  # the batch work is small ops; the cores are the step's
    source, num_slots, environ, start_method = pickle.loads(args)
    # The fork server's environment is the parent's when the server started; the run's is now.
    os.environ.clear()
    os.environ.update(environ)
    # A fork-server child defaults to starting its own processes from the fork server; the
    # DataLoader workers of `num_workers` must start as they would in the parent (fork on Linux):
    # from the fork server, each epoch's workers unpickled the dataset anew (1.1 s an epoch of
    # the digits job at --num-workers 2, against 0.11 s).
    multiprocessing.set_start_method(start_method, force=True)
    # The parent built the same layout from the same config and said what it had to say
    # (warnings and log records of the store's checks); the child's copies would repeat it.
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    try:
        layout = source()
    except BaseException as exc:
        _send_error(results, exc)
        return
    results.send(("ready",))
    slots = _ChildSlots(num_slots, results, consumed)
    # Commands that came during an epoch, for after it: an epoch queued ahead, or a close.
    pending: list[tuple[Any, ...]] = []
    while True:
        try:
            message = pending.pop(0) if pending else commands.recv()
        except EOFError:  # the parent is gone
            return
        kind = message[0]
        if kind == "close":
            return
        if kind == "renew":
            slots.renew(message[1])
        elif kind == "stop":
            results.send(("stopped",))
        elif kind == "epoch":
            try:
                _epoch(layout, message, commands, results, slots, pending)
            except (_ParentGone, BrokenPipeError, ConnectionResetError):
                return  # the parent is gone: nobody to make batches for
            except BaseException as exc:
                _send_error(results, exc)


class _ParentGone(Exception):
    """The parent closed its end of the command pipe."""


def _epoch(
    layout: Any,
    message: tuple[Any, ...],
    commands: connection.Connection,
    results: connection.Connection,
    slots: _ChildSlots,
    pending: list[tuple[Any, ...]],
) -> None:
    """Make one epoch's batches; an epoch command meanwhile is queued in `pending` for after
    it, a stop drops both (a close, everything but the close)."""
    _, plan_state, steps, hash_stride, then_state = message
    plan = plan_from_state(plan_state)
    then = None if then_state is None else plan_from_state(then_state)
    source = layout.batches(plan, steps, hash_stride=hash_stride, then=then)
    try:
        for batch in source:
            # Wait for the next batch's slot to be done with, acting on any command meanwhile
            # (the wait is the command pipe's poll: a stop ends it at once).
            while not slots.writable() or commands.poll():
                if commands.poll(_SLOT_WAIT) and _command(commands, slots, pending):
                    results.send(("stopped",))
                    return
            slot = slots.sent % slots.count
            payload = slots.pack(slot, batch)
            results.send(("batch", slot, payload))
            slots.sent += 1
        results.send(("done",))
    finally:
        source.close()  # the stream's reader threads stop


def _command(
    commands: connection.Connection, slots: _ChildSlots, pending: list[tuple[Any, ...]]
) -> bool:
    """Take one command during an epoch; True if it says to stop. A slot given up is renewed at
    once; an epoch command is queued in `pending`; a stop or a close drops what is queued (a
    close stays, to be acted on)."""
    try:
        message = commands.recv()
    except EOFError as exc:
        raise _ParentGone from exc
    kind = message[0]
    if kind == "renew":
        slots.renew(message[1])
        return False
    if kind == "epoch":
        pending.append(message)
        return False
    if kind in ("stop", "close"):
        pending.clear()
        if kind == "close":
            pending.append(message)
        return True
    raise AssertionError(f"unexpected command during an epoch: {kind}")


def _send_error(results: connection.Connection, exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        results.send(("error", None, text))
    else:
        results.send(("error", exc, text))


class _ChildSlots:
    """The child's shared-memory slots: which are free, and writing a batch into one."""

    def __init__(self, count: int, results: connection.Connection, consumed: Any) -> None:
        self.count = count
        self.results = results
        self.consumed = consumed  # the parent's count of batches it is done with
        self.sent = 0  # batches sent, over all epochs: batch n goes to slot n % count
        self.tensors: dict[int, torch.Tensor] = {}

    def writable(self) -> bool:
        """Whether the next batch's slot is free: its previous batch is done with."""
        return self.sent - self.consumed.value < self.count

    def renew(self, slot: int) -> None:
        """Forget `slot`'s memory, which the parent left to a batch still held there: the next
        batch in the slot gets memory of its own (and the parent a "slot" message)."""
        self.tensors.pop(slot, None)

    def pack(self, slot: int, batch: Any) -> bytes:
        """Pickle `batch` with its tensors and arrays written into `slot` (grown to fit)."""
        buffer = io.BytesIO()
        pickler = _SlotPickler(buffer)
        pickler.dump(batch)
        size = pickler.size
        held = self.tensors.get(slot)
        if held is None or held.numel() < size:
            held = torch.empty(-(-int(size * _GROWTH) // _ALIGN) * _ALIGN, dtype=torch.uint8)
            held.share_memory_()
            self.tensors[slot] = held
            self.results.send(("slot", slot, held))
        for offset, value in pickler.pending:
            _write(held, offset, value)
        return buffer.getvalue()


def _write(slot: torch.Tensor, offset: int, value: torch.Tensor | np.ndarray) -> None:
    if isinstance(value, torch.Tensor):
        nbytes = value.numel() * value.element_size()
        slot[offset : offset + nbytes].view(value.dtype).view(value.shape).copy_(value)
    else:
        target = slot[offset : offset + value.nbytes].numpy().view(value.dtype)
        target.reshape(value.shape)[...] = value


class _SlotPickler(pickle.Pickler):
    """Pickles a batch, replacing each tensor and numeric array by its place in a slot."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.size = 0
        self.pending: list[tuple[int, torch.Tensor | np.ndarray]] = []

    def persistent_id(self, obj: Any) -> tuple[Any, ...] | None:
        # The parent rebuilds each with one call: an `as_strided` of the slot's typed view (a
        # tensor) or an `ndarray` over the slot's buffer (an array).
        if isinstance(obj, torch.Tensor) and obj.layout == torch.strided and not obj.is_cuda:
            size = obj.element_size()
            offset = self._place(obj, obj.numel() * size)
            dtype = str(obj.dtype).removeprefix("torch.")
            return ("t", dtype, tuple(obj.shape), _contiguous_strides(obj.shape), offset // size)
        if isinstance(obj, np.ndarray) and obj.dtype.kind in "biufc":
            return ("n", obj.dtype.str, obj.shape, self._place(obj, obj.nbytes))
        return None

    def _place(self, value: torch.Tensor | np.ndarray, nbytes: int) -> int:
        offset = self.size
        self.pending.append((offset, value))
        self.size += -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        return offset


class _SlotUnpickler(pickle.Unpickler):
    """Rebuilds a batch with its tensors and arrays as views of a slot."""

    def __init__(
        self,
        file: io.BytesIO,
        typed: Callable[[torch.dtype], torch.Tensor],
        array: np.ndarray,
    ) -> None:
        """`typed(dtype)`: the slot as a 1-D tensor of `dtype`; `array`: its bytes, uint8."""
        super().__init__(file)
        self.typed = typed
        self.array = array

    def persistent_load(self, pid: tuple[Any, ...]) -> Any:
        if pid[0] == "t":
            _, dtype, shape, strides, offset = pid
            return self.typed(getattr(torch, dtype)).as_strided(shape, strides, offset)
        _, dtype, shape, offset = pid
        return np.ndarray(shape, np.dtype(dtype), buffer=self.array, offset=offset)


def _contiguous_strides(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


# -- starting and stopping the child


_MAIN_KEYS = ("init_main_from_name", "init_main_from_path")
_launch_lock = threading.Lock()


@contextlib.contextmanager
def _without_main() -> Iterator[None]:
    """Start children without importing the parent's `__main__` in them.

    multiprocessing re-imports the parent's main module in a fork-server child, so that objects
    defined there unpickle; the child needs none of them (its arguments are a config and plain
    values), and importing a script without a main guard would run it again.
    """
    original = spawn.get_preparation_data

    def preparation_data(name: str) -> dict[str, Any]:
        data: dict[str, Any] = original(name)
        for key in _MAIN_KEYS:
            data.pop(key, None)
        return data

    with _launch_lock:
        spawn.get_preparation_data = preparation_data
        try:
            yield
        finally:
            spawn.get_preparation_data = original


def _start_method() -> str:
    """The parent's default start method (what its DataLoader workers would use)."""
    method = multiprocessing.get_start_method(allow_none=True)
    return method if method is not None else multiprocessing.get_all_start_methods()[0]


def _shutdown(process: multiprocessing.process.BaseProcess, commands: Any) -> None:
    """Ask the child to exit, then make sure it does (a finalizer: also at interpreter exit)."""
    with contextlib.suppress(Exception):
        commands.send(("close",))
    with contextlib.suppress(Exception):
        commands.close()
    process.join(timeout=10)
    if process.is_alive():
        process.kill()
        process.join()


__all__ = [
    "BatchProcess",
    "BatchProcessError",
    "BatchSource",
    "NextEpoch",
]
