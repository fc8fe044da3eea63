"""The collective group: prefill and decode actors joined in one torch.distributed process group (NCCL between GPUs,
gloo between CPU processes), so chunk KV can move device to device instead of through host memory and gRPC.

Which actors join is decided once, at cluster start (`plan_group`), and per fetch the path is chosen again
(`choose_path`): both ends in the group and, for NCCL, both on GPUs -> collective; anything else -> gRPC. Forming
the group never hangs: the rendezvous store, the process-group init and every later send/recv have deadlines, and
a group that did not form (or broke later) leaves the cluster on gRPC, with an error naming the peer at fault.

NVLink multicast stays off in every member (`NVLS_OFF_ENV`, set here before init and passed to Ray workers through
`runtime_env`): on the shared multi-GPU hosts a program that uses it can take the host's GPUs out of service.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import ray
import torch
import torch.distributed as dist
from pdllm.cluster.kv.transport import TransferError

log = logging.getLogger(__name__)

# NVLink multicast off in NCCL, PyTorch symmetric memory and NVSHMEM (the device docs name these three).
NVLS_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# On an NCCL error or watchdog timeout: abort the communicators and raise, instead of killing the actor process
# (PyTorch's default tears the process down; a serving actor must live on and fall back to gRPC).
NCCL_ERROR_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
KV_TRANSPORTS = ("auto", "grpc", "gloo")  # the `kv_transport` setting of a cluster config
MODES = KV_TRANSPORTS
PREFILL, DECODE = "prefill", "decode"


class CollectiveError(TransferError):
    """The collective path failed (rendezvous, announcement, send/recv, verification); the message names the peer."""


def actor_env() -> dict[str, str]:
    """Environment every actor that may join a collective group starts with."""
    return {**NVLS_OFF_ENV, **NCCL_ERROR_ENV}


def with_actor_env(runtime_env: dict | None = None) -> dict:
    """`runtime_env` (Ray actor option) with actor_env() added to its env_vars (ours win: they are safety settings)."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), **actor_env()}
    return env


@dataclass(frozen=True)
class Member:
    name: str  # Ray actor name (the control path reaches the peer through it)
    role: str  # PREFILL (holds chunks, sends) or DECODE (receives)
    device: str  # "cuda" or "cpu": where the member keeps chunk KV
    gpu: str = ""  # identity of the physical GPU it uses ("" on CPU): NCCL needs one rank per GPU
    address: str = ""  # the holder's ChunkTransfer gRPC address: how FetchItems and index entries name it


@dataclass(frozen=True)
class GroupSpec:
    backend: str  # "nccl" or "gloo"
    members: tuple[Member, ...]  # rank = position
    store_host: str
    store_port: int
    timeout_s: float  # rendezvous, and each transfer's tensor phase
    group_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def rank(self, name: str) -> int:
        for i, m in enumerate(self.members):
            if m.name == name:
                return i
        raise CollectiveError(f"{name} is not a member of collective group {self.group_id}")

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)

    def holder_at(self, address: str) -> Member | None:
        return next((m for m in self.members if address and m.address == address and m.role == PREFILL), None)


def plan_group(mode: str, members: list[Member]) -> tuple[str, list[Member]] | None:
    """Backend and members of the group, or None (everything over gRPC).

    auto: NCCL among the actors on GPUs, one per physical GPU (actors sharing a GPU stay on gRPC / same-node
    reads); gloo: every actor (CPU clusters, tests); grpc: no group. A group needs a prefill and a decode member."""
    if mode not in MODES:
        raise ValueError(f"kv_transport must be one of {MODES}, got {mode!r}")
    if mode == "grpc":
        return None
    if mode == "gloo":
        backend, chosen = "gloo", list(members)
    else:
        gpus = [m.gpu for m in members if m.device == "cuda"]
        backend = "nccl"
        chosen = [m for m in members if m.device == "cuda" and m.gpu and gpus.count(m.gpu) == 1]
    roles = {m.role for m in chosen}
    if PREFILL not in roles or DECODE not in roles:
        return None
    return backend, chosen


def choose_path(spec: GroupSpec | None, me: Member | None, peer: Member | None) -> str:
    """ "nccl" / "gloo" when both ends are in the group (and, for NCCL, both on GPUs); otherwise "grpc"."""
    if spec is None or me is None or peer is None:
        return "grpc"
    if spec.member(me.name) is None or spec.member(peer.name) is None or me.name == peer.name:
        return "grpc"
    if spec.backend == "nccl" and not (me.device == "cuda" and peer.device == "cuda"):
        return "grpc"
    return spec.backend


def gpu_identity(device: str) -> str:
    """The physical GPU this process uses (its UUID), so two actors sharing one GPU are told apart from two GPUs."""
    if device != "cuda":
        return ""
    index = torch.cuda.current_device()
    uid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uid) if uid else f"{socket.gethostname()}:{os.environ.get('CUDA_VISIBLE_DEVICES', '')}:{index}"


def _within(fn, seconds: float) -> tuple[bool, BaseException | None]:
    """Run fn in a daemon thread; (finished, its exception). A call that never returns cannot hang the caller."""
    box: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # reported to the caller
            box[0] = e

    thread = threading.Thread(target=run, daemon=True, name="collective-deadline")
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), box[0]


def _group_count(value: int | None = None) -> int | None:
    """torch names the default group (and prefixes its store keys) by a per-process counter that every init
    advances, failed ones too; read it, or put it back after a failed init. None where torch has no such counter."""
    world = getattr(dist.distributed_c10d, "_world", None)
    if world is None or not hasattr(world, "group_count"):
        return None
    if value is not None:
        world.group_count = value
    return world.group_count


def pair_ops(spec: GroupSpec | None) -> bool:
    """Whether send/recv go out one by one (groups of more than two ranks) instead of as one batch.

    torch runs a batch (batch_isend_irecv) on the NCCL communicator of the whole group, whose operations queue on
    one stream per process, and a single isend/irecv on a communicator of just the two ranks, with its own stream.
    On the group's communicator a holder's send to a slow or dead receiver holds up its sends to every other
    one, and with two holders and two receivers the waits can close a cycle (holder 1 sends to A, A receives from
    holder 2, holder 2 sends to B, B receives from holder 1): a deadlock until the timeout. Pairs are independent."""
    return spec is not None and len(spec.members) > 2


def holder_pairs(spec: GroupSpec) -> list[tuple[int, int]]:
    """(lower rank, higher rank) of every pair that can carry KV (a prefill and a decode member), in one order."""
    ranks = range(len(spec.members))
    return [(a, b) for a in ranks for b in ranks if a < b and spec.members[a].role != spec.members[b].role]


def _connect_pairs(spec: GroupSpec, rank: int, deadline: float) -> None:
    """Make every holder-receiver pair's communicator now (NCCL creates one on a pair's first send/recv, both ends
    at once), with one small exchange per pair, in one order on every rank: the first pair not yet done always
    has both its ranks waiting on it, so this cannot deadlock, and no transfer later builds a communicator while
    another rank waits on it."""
    device = torch.device("cuda", torch.cuda.current_device()) if spec.backend == "nccl" else torch.device("cpu")
    for low, high in holder_pairs(spec):
        if rank not in (low, high):
            continue
        want = low * len(spec.members) + high
        token = torch.full((1,), want if rank == low else -1, dtype=torch.int64, device=device)
        work = dist.isend(token, high) if rank == low else dist.irecv(token, low)
        work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
        while spec.backend == "nccl" and not work.is_completed():  # wait() only ordered the stream after it
            if time.monotonic() > deadline:
                raise CollectiveError(f"rank {rank}: the first exchange with rank {high if rank == low else low} "
                                      "did not complete in time")  # fmt: skip
            time.sleep(0.001)
        if rank == high and int(token.item()) != want:
            raise CollectiveError(f"rank {rank}: the first exchange with rank {low} carried {int(token.item())}")


class CollectiveGroup:
    """This process's membership (torch.distributed's default group: one per process, so one per actor)."""

    def __init__(self) -> None:
        self.spec: GroupSpec | None = None
        self.me: Member | None = None
        self.broken: str | None = None  # why the collective path is no longer used (None: usable)
        self.peers_off: dict[str, str] = {}  # peer -> why transfers with it go over gRPC now (group still usable)
        self.sent_bytes = 0
        self.received_bytes = 0
        self._master = None  # rank 0 hosts the rendezvous store (it must live as long as the group)
        self._lock = threading.Lock()
        self._post_lock = threading.Lock()

    @property
    def usable(self) -> bool:
        return self.spec is not None and self.broken is None

    def usable_with(self, peer: str) -> bool:
        return self.usable and peer not in self.peers_off

    def mark_broken(self, reason: str) -> None:
        """Stop using the group: an operation may still be pending in it, so later ones could pair up wrongly."""
        if self.broken is None:
            self.broken = reason
            log.warning("collective path off, KV goes over gRPC from now on: %s", reason)

    def take_off(self, peer: str, reason: str, posted: bool) -> None:
        """A transfer with `peer` failed. Before anything was posted, or with gloo (its pairs are independent
        sockets), only that peer is taken off; an NCCL operation left pending can hold up every later one on the
        communicator's stream, so then the whole group is."""
        if posted and self.spec is not None and self.spec.backend == "nccl":
            self.mark_broken(reason)
        elif peer not in self.peers_off:
            self.peers_off[peer] = reason
            log.warning("collective path to %s off, its KV goes over gRPC from now on: %s", peer, reason)

    def host_store(self, timeout_s: float) -> tuple[str, int]:
        """Start the rendezvous store (rank 0 does this before anyone joins); returns (host, port)."""
        from torch.distributed import TCPStore

        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        self._master = TCPStore(host, 0, None, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        return host, self._master.port

    def join(self, spec: GroupSpec, name: str) -> dict:
        """Init the process group as `name`'s rank; raises CollectiveError naming the peers that never joined."""
        with self._lock:
            if self.spec is not None:
                raise CollectiveError(f"{name} is already in collective group {self.spec.group_id}")
            if dist.is_initialized():
                raise CollectiveError(f"{name}: this process already has a torch.distributed group of its own")
            rank = spec.rank(name)
            os.environ.update(actor_env())
            store = self._store(spec, rank)
            store.set(f"member/{rank}", name)
            timeout = timedelta(seconds=spec.timeout_s)
            device_id = torch.device("cuda", torch.cuda.current_device()) if spec.backend == "nccl" else None

            def init() -> None:
                kwargs = {"device_id": device_id} if device_id is not None else {}
                dist.init_process_group(
                    spec.backend, store=store, rank=rank, world_size=len(spec.members), timeout=timeout, **kwargs
                )
                if pair_ops(spec):
                    _connect_pairs(spec, rank, time.monotonic() + spec.timeout_s)

            count = _group_count()
            done, error = _within(init, spec.timeout_s + 5)
            if not done or error is not None:
                absent = self._absent(store, spec)
                if done:
                    self._teardown()
                    _group_count(count)  # a failed init still advanced it: a later join must agree with new peers
                else:  # init is stuck inside the library: never touch this group again
                    self.broken = f"process-group init of {spec.group_id} hung"
                cause = "no answer" if not done else f"{type(error).__name__}: {error}"
                raise CollectiveError(
                    f"{name} (rank {rank}) could not form the {spec.backend} group {spec.group_id} of "
                    f"{len(spec.members)} within {spec.timeout_s:.0f}s; peers that never joined: "
                    f"{', '.join(absent) or 'none'}; cause: {cause}"
                )
            self.spec, self.me, self.broken, self.peers_off = spec, spec.members[rank], None, {}
        return {"name": name, "rank": rank, "backend": spec.backend, "env": {k: os.environ.get(k) for k in actor_env()}}

    def _store(self, spec: GroupSpec, rank: int):
        from torch.distributed import PrefixStore, TCPStore

        if rank == 0:
            if self._master is None:
                raise CollectiveError(f"rank 0 ({spec.members[0].name}) has no rendezvous store: host_store first")
            base = self._master
        else:
            try:
                base = TCPStore(
                    spec.store_host, spec.store_port, None, False, timeout=timedelta(seconds=spec.timeout_s)
                )
            except Exception as e:  # torch raises DistStoreError / RuntimeError here
                raise CollectiveError(
                    f"rank {rank} cannot reach the rendezvous store of {spec.members[0].name} at "
                    f"{spec.store_host}:{spec.store_port}: {e}"
                ) from e
        return PrefixStore(f"pdllm/{spec.group_id}", base)

    @staticmethod
    def _absent(store, spec: GroupSpec) -> list[str]:
        try:
            return [m.name for r, m in enumerate(spec.members) if not store.check([f"member/{r}"])]
        except Exception:  # the store itself is gone (rank 0 died): nobody can be checked
            return [f"{spec.members[0].name} (the rendezvous store)"]

    def _teardown(self) -> None:
        if dist.is_initialized():
            done, _ = _within(dist.destroy_process_group, 10.0)
            if not done:
                self.broken = "process-group teardown hung"

    def leave(self) -> None:
        """Leave the group (cluster shutdown, or a formation that failed elsewhere)."""
        with self._lock:
            if self.spec is not None or dist.is_initialized():
                self._teardown()
            self.spec, self.me = None, None
            self._master = None

    def post(self, ops: list[tuple[str, torch.Tensor, int]]) -> list:
        """Post ("send"|"recv", tensor, peer rank) operations, in order; returns their works. Two ranks: as one
        batch. More: each on its own, so that with NCCL every pair of ranks has its own communicator and stream
        (`pair_ops`)."""
        fns = {"send": dist.isend, "recv": dist.irecv}
        with self._post_lock:
            if pair_ops(self.spec):
                return [fns[kind](t, peer) for kind, t, peer in ops]
            return dist.batch_isend_irecv([dist.P2POp(fns[kind], t, peer) for kind, t, peer in ops])

    def wait(self, works: list, deadline: float, what: str, abort=None) -> None:
        """Wait for `works` until `deadline` (time.monotonic); `abort()` may return a reason to give up early (the
        peer already reported failure). Raises CollectiveError saying `what` did not complete, and why.

        Each work's own timed wait runs in a helper thread (gloo only progresses a send/recv inside wait(), and its
        is_completed() stays False until then), so this thread can keep checking `abort`. With NCCL, wait() may
        only order the current stream after the operation, so the helper also polls is_completed() (a CUDA event
        query) until the GPU is done: the transfer has really finished, or failed, within the deadline."""
        box: list[BaseException] = []
        on_gpu = self.spec is not None and self.spec.backend == "nccl"

        def run() -> None:
            try:
                for w in works:
                    w.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
                    while on_gpu and not w.is_completed():
                        if time.monotonic() > deadline:
                            raise TimeoutError("the GPU has not finished the operation")
                        time.sleep(0.0001)
            except BaseException as e:  # reported below
                box.append(e)

        waiter = threading.Thread(target=run, daemon=True, name="collective-wait")
        waiter.start()
        next_check = time.monotonic() + 0.01
        while waiter.is_alive():
            waiter.join(0.01)  # returns as soon as the waits are done
            now = time.monotonic()
            if waiter.is_alive() and now > deadline + 1.0:  # the library's own timeout should have fired by now
                raise CollectiveError(f"{what}: not complete within the deadline")
            if waiter.is_alive() and abort is not None and now >= next_check:
                reason = abort()
                if reason:
                    raise CollectiveError(f"{what}: {reason}")
                next_check = now + 0.01
        if box:
            late = time.monotonic() >= deadline - 0.01
            cause = f"{type(box[0]).__name__}: {box[0]}"
            raise CollectiveError(f"{what}: not complete within the deadline ({cause})" if late else f"{what}: {cause}")

    def status(self) -> dict:
        return {
            "group": self.spec.group_id if self.spec else None,
            "backend": self.spec.backend if self.spec else None,
            "rank": self.spec.rank(self.me.name) if self.spec and self.me else None,
            "broken": self.broken,
            "peers_off": dict(self.peers_off),
            "sent_bytes": self.sent_bytes,
            "received_bytes": self.received_bytes,
            "env": {k: os.environ.get(k) for k in actor_env()},
        }


class CollectiveMember:
    """Ray-callable collective methods, mixed into the prefill and decode workers (they set `self.collective`,
    `self.device`, `self.name`; a holder also has `self.store`)."""

    collective: CollectiveGroup

    def collective_probe(self) -> dict:
        store = getattr(self, "store", None)  # a ChunkStore is falsy while empty: compare with None
        address = store.address if store is not None else ""
        return {"device": self.device, "gpu": gpu_identity(self.device), "address": address}

    def collective_host(self, timeout_s: float) -> tuple[str, int]:
        return self.collective.host_store(timeout_s)

    def collective_join(self, spec: GroupSpec) -> dict:
        return self.collective.join(spec, self.name)

    def collective_leave(self) -> None:
        self.collective.leave()

    def collective_status(self) -> dict:
        return self.collective.status()


@dataclass
class Formation:
    spec: GroupSpec | None  # None: no group (every fetch over gRPC)
    reason: str = ""  # why there is no group
    errors: dict[str, str] = field(default_factory=dict)  # member -> its join error
    joined: dict[str, dict] = field(default_factory=dict)  # member -> its join reply (rank, backend, env)


def form_group(actors: list[tuple[str, str, object]], mode: str, timeout_s: float) -> Formation:
    """Driver side: probe (role, name, handle) actors, plan, host the store on rank 0, join all at once. Never
    raises for a member's failure: a failed formation is torn down everywhere and the cluster stays on gRPC."""
    if mode == "grpc":
        return Formation(None, "kv_transport is grpc")
    start = time.monotonic()
    handles = {name: handle for _, name, handle in actors}
    try:
        probes = ray.get([h.collective_probe.remote() for _, _, h in actors], timeout=timeout_s)
    except Exception as e:  # a dead or stuck actor: no group, gRPC as before
        return Formation(None, f"probing the actors failed: {e}")
    members = [Member(name, role, **p) for (role, name, _), p in zip(actors, probes, strict=True)]
    plan = plan_group(mode, members)
    if plan is None:
        return Formation(None, f"kv_transport {mode}: no prefill and decode actor can pair up (devices: "
                               f"{', '.join(f'{m.name}={m.device}' for m in members)})")  # fmt: skip
    backend, chosen = plan
    try:
        host, port = ray.get(handles[chosen[0].name].collective_host.remote(timeout_s), timeout=timeout_s)
    except Exception as e:
        return Formation(None, f"{chosen[0].name} could not host the rendezvous store: {e}")
    spec = GroupSpec(backend, tuple(chosen), host, port, timeout_s)
    refs = {m.name: handles[m.name].collective_join.remote(spec) for m in chosen}
    deadline = start + 2 * timeout_s + 10
    formation = Formation(spec)
    for name, ref in refs.items():
        try:
            formation.joined[name] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        except Exception as e:  # RayActorError, GetTimeoutError, or the member's CollectiveError
            formation.errors[name] = str(getattr(e, "cause", None) or e).strip().splitlines()[-1]
    if formation.errors:
        leaves = [handles[m.name].collective_leave.remote() for m in chosen]
        ray.wait(leaves, num_returns=len(leaves), timeout=15)
        formation.spec = None
        formation.reason = f"the {backend} group did not form: " + "; ".join(
            f"{n}: {e}" for n, e in formation.errors.items()
        )
        log.warning("%s; chunk KV goes over gRPC", formation.reason)
    return formation
