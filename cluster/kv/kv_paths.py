"""Which way a decode actor gets the chunk KV it does not hold, chosen per holder in one place, and the fetch over it.

Paths, best first (`choose_path`):
  local  the holder is this very process (its store is read directly)
  ipc    same node, both on CUDA, the same physical GPU: CUDA IPC, device to device (cluster/kv/ipc_transport.py)
  nccl   the collective group joins the two (different GPUs): NCCL (gloo between CPU processes, tests)
  node   same node otherwise: the holder's `read_chunks` through Ray's shared-memory object store (host memory)
  grpc   another node: the ChunkTransfer stream
A path that cannot serve a holder falls back within the same fetch: ipc -> node (and that holder stays off IPC),
nccl/gloo -> grpc (inside CollectiveTransport). On CPU no process has CUDA, so only the host paths are chosen.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import ray
from pdllm.cluster.kv.chunk_index import IndexEntry
from pdllm.cluster.kv.collective_group import gpu_identity
from pdllm.cluster.kv.ipc_transport import Alloc, IpcTransport, IpcUnavailable, ipc_supported
from pdllm.cluster.kv.transport import FetchItem, FetchResult, KVTransport

log = logging.getLogger(__name__)

LOCAL, IPC, NODE, GRPC = "local", "ipc", "node", "grpc"


@dataclass(frozen=True)
class Site:
    """Where a holder or a reader of chunk KV runs, as far as the choice of path goes."""

    name: str  # Ray actor name
    node: str  # Ray node id
    device: str  # "cuda" or "cpu": where it keeps chunk KV ("" when unknown)
    gpu: str = ""  # the physical GPU's identity (its UUID; "" on CPU or unknown)


def choose_path(reader: Site, holder: Site, collective: str = GRPC, ipc: bool = True) -> str:
    """The path for KV of `holder` to reach `reader`. `collective`: what the collective group offers between
    them ("nccl", "gloo", or "grpc" for nothing); `ipc`: CUDA IPC allowed (config, and not taken off)."""
    if holder.name == reader.name:
        return LOCAL
    same_node = bool(holder.node) and holder.node == reader.node
    same_gpu = reader.device == holder.device == "cuda" and bool(reader.gpu) and reader.gpu == holder.gpu
    if ipc and same_node and same_gpu:
        return IPC
    if collective != GRPC:
        return collective
    return NODE if same_node else GRPC


@dataclass
class HolderFetch:
    """One holder's share of a fetch, and the path chosen for it."""

    path: str
    holder: str
    address: str
    items: list[FetchItem] = field(default_factory=list)


class KVPaths:
    """The decode side's router of fetches: plans a path per holder, fetches over it, falls back."""

    def __init__(
        self,
        me: Site,
        transport: KVTransport,
        ipc: bool = True,
        probe_timeout_s: float = 3.0,
        sites: dict[str, Site] | None = None,
    ) -> None:
        self.me, self.transport = me, transport
        self.ipc = IpcTransport(me.name, me.device) if ipc and ipc_supported(me.device) else None
        self.probe_timeout_s = probe_timeout_s
        self.ipc_off: dict[str, str] = {}  # holder -> why its KV no longer comes over IPC
        self.fallbacks = 0
        self._sites: dict[str, Site] = dict(sites or {})  # holder name -> site (probed once)
        self._lock = threading.Lock()

    @classmethod
    def for_actor(cls, name: str, node: str, device: str, transport: KVTransport, ipc: bool, **kw) -> KVPaths:
        return cls(Site(name, node, device, gpu_identity(device)), transport, ipc, **kw)

    def site(self, holder: str, node: str) -> Site:
        """The holder's site: its device and GPU asked once (`collective_probe`); unknown if it does not answer."""
        with self._lock:
            known = self._sites.get(holder)
        if known is not None:
            return known
        try:
            probe = ray.get(ray.get_actor(holder).collective_probe.remote(), timeout=self.probe_timeout_s)
            site = Site(holder, node, probe.get("device", ""), probe.get("gpu", ""))
        except Exception as e:  # dead or stuck: not remembered, so a later fetch asks again
            log.warning("probing holder %s: %s: %s", holder, type(e).__name__, e)
            return Site(holder, node, "")
        with self._lock:
            self._sites[holder] = site
        return site

    def path_for(self, entry: IndexEntry) -> str:
        """The one decision: which path KV of this index entry's holder takes to this reader."""
        ipc = self.ipc is not None and entry.holder not in self.ipc_off
        holder = self.site(entry.holder, entry.node) if ipc and entry.node == self.me.node else None
        holder = holder or Site(entry.holder, entry.node, "")
        return choose_path(self.me, holder, self._collective(entry.address), ipc)

    def _collective(self, address: str) -> str:
        if not self.transport.serves_directly(address):
            return GRPC
        spec = getattr(getattr(self.transport, "group", None), "spec", None)
        return spec.backend if spec is not None else "collective"

    def plan(self, cids: list[str], entries: dict[str, IndexEntry]) -> list[HolderFetch]:
        """Group the chunks by holder (one failing holder costs only its own chunks), each with its path."""
        groups: dict[tuple[str, str], HolderFetch] = {}
        for cid in cids:
            entry = entries[cid]
            path = self.path_for(entry)
            path = NODE if path == LOCAL else path  # a store in this process is read like a same-node one
            key = (entry.holder, entry.address)
            group = groups.setdefault(key, HolderFetch(path, entry.holder, entry.address))
            group.items.append(FetchItem(cid, entry.address))
        return list(groups.values())

    def fetch(self, group: HolderFetch, timeout_s: float, alloc: Alloc | None = None) -> FetchResult:
        """One holder's chunks over its path (falling back as the module docstring says). Raises TransferError
        for a fetch worth trying again; a same-node read that fails returns its chunks missing, with `error`."""
        if group.path == IPC and self.ipc is not None:
            try:
                return self.ipc.fetch(group.holder, group.items, timeout_s, alloc)
            except IpcUnavailable as e:
                self.fallbacks += 1
                self.ipc_off[group.holder] = str(e)
                log.warning("chunk KV of %s over host memory from now on: %s", group.holder, e)
                return self._node(group, timeout_s)
        if group.path in (IPC, NODE, LOCAL):
            return self._node(group, timeout_s)
        return self.transport.fetch(group.items, timeout_s)

    @staticmethod
    def _node(group: HolderFetch, timeout_s: float) -> FetchResult:
        cids = [i.chunk_id for i in group.items]
        try:
            actor = ray.get_actor(group.holder)
            found = ray.get(actor.read_chunks.remote(cids), timeout=timeout_s)
        except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            return FetchResult(missing=cids, error=f"same-node read failed: {type(e).__name__}")
        missing = [c for c in cids if c not in found]
        nbytes = sum(c.nbytes() for c in found.values())
        return FetchResult(chunks=found, missing=missing, bytes=nbytes, paths={NODE: len(found)} if found else {})

    def status(self) -> dict:
        return {"ipc": self.ipc is not None, "ipc_off": dict(self.ipc_off), "fallbacks": self.fallbacks,
                "ipc_received_bytes": self.ipc.received_bytes if self.ipc else 0}  # fmt: skip
