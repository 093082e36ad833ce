"""A small informer: a watch-fed cache of the objects one list call returns (e.g. a namespace's ModelMerges).

It lists, then watches from the list's resourceVersion, re-watching from the last version it saw (bookmarks
keep that fresh) each time a watch ends; it relists when that version is too old (410 Gone) or the connection
fails. What this process wrote itself can be put in at once (`remember`), so its reads see its own writes; a
late event never rolls an object back (an object's resourceVersion only grows). Each object's view (what the
readers want, e.g. a REST job) is computed once when it arrives, not on every read."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

from kubernetes import watch

from modelmerge import kubeclient

log = logging.getLogger("modelmerge.api.informer")

View = TypeVar("View")
GONE = 410


class Cached(NamedTuple, Generic[View]):
    obj: dict[str, Any]
    view: View


class Informer(Generic[View]):
    """`list_objects(*list_args)` is a generated list method (e.g. `CustomObjectsApi.list_namespaced_custom_object`),
    called for lists and watches. `make_view(obj, previous)` turns an object into its view;
    `previous` is the cached view of the same object (None for a new one), so a view can carry state forward.
    `entries()` are sorted by `order` (descending with `descending=True`)."""

    def __init__(self, list_objects: Callable[..., dict[str, Any]], list_args: tuple[Any, ...], *,
                 make_view: Callable[[dict[str, Any], View | None], View], order: Callable[[Cached[View]], Any],
                 descending: bool = False, what: str = "objects", watch_timeout_s: int = 300,
                 retry_s: float = 1.0) -> None:
        self._list_objects, self._list_args = list_objects, list_args
        self._make_view, self._order, self._descending = make_view, order, descending
        self._what, self._watch_timeout_s, self._retry_s = what, watch_timeout_s, retry_s
        self._cache: dict[str, Cached[View]] = {}
        self._sorted: list[Cached[View]] | None = None  # sorted view of the cache, rebuilt after changes
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self._what}", daemon=True)
        self._thread.start()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Whether the first list has arrived (waiting at most `timeout` seconds for it)."""
        return self._synced.wait(timeout)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping.set()
            if self._watch is not None:
                self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    # ---- reads and writes ------------------------------------------------------------------------------

    def get(self, name: str) -> Cached[View] | None:
        with self._lock:
            return self._cache.get(name)

    def entries(self) -> list[Cached[View]]:
        """Every cached object, in order (the list is shared until the next change: do not modify it)."""
        with self._lock:
            if self._sorted is None:
                self._sorted = sorted(self._cache.values(), key=self._order, reverse=self._descending)
            return self._sorted

    def relist(self) -> str:
        """Replace the cache with a fresh list; returns the list's resourceVersion. Raises the list's errors."""
        listing = kubeclient.raw(self._list_objects, *self._list_args)
        with self._lock:
            previous = self._cache
        fresh = {}
        for obj in listing.get("items") or []:
            name = obj["metadata"]["name"]
            known = previous.get(name)
            fresh[name] = Cached(obj, self._make_view(obj, _same_object(known, obj)))
        with self._lock:
            self._cache, self._sorted = fresh, None
        self._synced.set()
        return listing["metadata"]["resourceVersion"]

    def remember(self, obj: dict[str, Any], *, deleted: bool = False) -> Cached[View] | None:
        """Put an object in the cache (or take it out), unless the cache already has a newer version of it.
        Returns what the cache holds for it afterwards."""
        name = obj["metadata"]["name"]
        if deleted:
            with self._lock:
                self._cache.pop(name, None)
                self._sorted = None
            return None
        known = self.get(name)
        if known is not None and resource_version(obj) < resource_version(known.obj):
            return known
        entry = Cached(obj, self._make_view(obj, _same_object(known, obj)))
        with self._lock:
            known = self._cache.get(name)  # again: the watch thread may have been quicker
            if known is not None and resource_version(obj) < resource_version(known.obj):
                return known
            self._cache[name] = entry
            self._sorted = None
        return entry

    # ---- the watch thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        version: str | None = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self.relist()
                version = self._follow(version)
            except Exception as exc:  # 410 Gone, dropped connections and the like: relist and go on
                if self._stopping.is_set():
                    return
                version = None
                if getattr(exc, "status", None) != GONE:
                    log.warning("watching %s failed (%s); relisting", self._what, exc)
                    self._stopping.wait(self._retry_s)

    def _follow(self, version: str) -> str:
        """Watch from `version` until the server ends the watch; returns the last resourceVersion seen."""
        with self._lock:
            if self._stopping.is_set():
                return version
            self._watch = watch.Watch()
        events = self._watch.stream(self._list_objects, *self._list_args, resource_version=version,
                                    timeout_seconds=self._watch_timeout_s, allow_watch_bookmarks=True)
        for event in events:
            if self._stopping.is_set():
                break
            obj = event["raw_object"]
            version = (obj.get("metadata") or {}).get("resourceVersion") or version
            if event["type"] != "BOOKMARK":
                self.remember(obj, deleted=event["type"] == "DELETED")
        return version


def resource_version(obj: dict[str, Any]) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion", 0))
    except ValueError:
        return 0


def _same_object(known: Cached[View] | None, obj: dict[str, Any]) -> View | None:
    """The cached view when it is of the same object (not of a deleted one with the same name)."""
    if known is None or known.obj["metadata"].get("uid") != obj["metadata"].get("uid"):
        return None
    return known.view
