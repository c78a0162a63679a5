"""``RemoteValueStore``: the model's value backend, backed by the asyncio client on a thread.

(:class:`~ultramem_dist.client.process_store.ProcessValueStore` runs the same client in a
lookup process instead, which keeps its interpreter time off the model's GIL.)

The model thread calls :meth:`RemoteValueStore.submit` and gets a
``concurrent.futures.Future`` at once; the lookup runs on a private event loop in a background
thread, so the caller can keep computing and collect the pooled tensor later with
``future.result()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol, Self, TypeVar

import torch

from ultramem_dist.client.channels import ChannelOptions
from ultramem_dist.client.client import GatherClient
from ultramem_dist.client.layout import StoreLayout

__all__ = ["RemoteValueStore", "SelectionLike", "ValueStoreHandle", "pre_input_of"]

T = TypeVar("T")


class SelectionLike(Protocol):
    """A memory layer's selection (:class:`~ultramem_dist.model.Selection`); UltraMemV2
    selections also carry ``pre_input`` ``[T, pre_vdim]`` (read with :func:`pre_input_of`)."""

    indices: torch.Tensor
    blocks: torch.Tensor
    weights: torch.Tensor


def pre_input_of(sel: SelectionLike) -> torch.Tensor | None:
    """The selection's UltraMemV2 ``pre_input`` (``None``: a v1 selection, or one without)."""
    return getattr(sel, "pre_input", None)


class ValueStoreHandle(ABC):
    """What a remote value backend offers the model: ``submit`` (returns at once), ``layout``,
    ``version``, ``close``; ``lookup`` and ``with`` come with it."""

    @property
    @abstractmethod
    def layout(self) -> StoreLayout: ...

    @property
    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def submit(self, table_id: str, sel: SelectionLike) -> concurrent.futures.Future[torch.Tensor]:
        """Start pooling ``sel`` on the shards (an UltraMemV2 selection with its
        ``pre_input``); the future resolves to ``[T, E, Dv]``/``[T, D]``."""

    @abstractmethod
    def close(self) -> None: ...

    def lookup(
        self, table_id: str, sel: SelectionLike, timeout: float | None = None
    ) -> torch.Tensor:
        """Blocking convenience: ``submit(...).result(timeout)``."""
        return self.submit(table_id, sel).result(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteValueStore(ValueStoreHandle):
    """Value backend that pools rows on remote shards (``submit(table_id, sel) -> Future``)."""

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        version: str | None = None,
        deadline_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        options: ChannelOptions | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ultramem-remote-store", daemon=True
        )
        self._thread.start()
        self._closed = False
        try:
            self._client: GatherClient = self._run(
                GatherClient.connect(
                    targets,
                    version=version,
                    deadline_s=deadline_s,
                    connect_timeout_s=connect_timeout_s,
                    options=options,
                )
            ).result()
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            coro.close()
            raise RuntimeError("RemoteValueStore is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    @property
    def layout(self) -> StoreLayout:
        return self._client.layout

    @property
    def version(self) -> str:
        return self._client.version

    def submit(self, table_id: str, sel: SelectionLike) -> concurrent.futures.Future[torch.Tensor]:
        """Start pooling ``sel`` on the shards (with its ``pre_input``, if any); the future
        resolves to ``[T, E, Dv]``/``[T, D]``."""
        return self._run(
            self._client.gather(
                table_id, sel.indices, sel.blocks, sel.weights, pre_input=pre_input_of(sel)
            )
        )

    def close(self) -> None:
        """Close the channels and stop the background loop (idempotent)."""
        if self._closed:
            return
        try:
            self._run(self._client.close()).result(timeout=10)
        finally:
            self._closed = True
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()
