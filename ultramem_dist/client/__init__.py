"""Clients of the sharded value store: asyncio fan-out client and the model's remote backend."""

from ultramem_dist.client.channels import ChannelOptions
from ultramem_dist.client.client import GatherClient, fetch_info
from ultramem_dist.client.layout import StoreLayout, TableLayout
from ultramem_dist.client.process_store import LookupProcess, ProcessValueStore
from ultramem_dist.client.remote_store import RemoteValueStore, ValueStoreHandle

__all__ = [
    "ChannelOptions",
    "GatherClient",
    "LookupProcess",
    "ProcessValueStore",
    "RemoteValueStore",
    "StoreLayout",
    "TableLayout",
    "ValueStoreHandle",
    "fetch_info",
]
