from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]

class Sharding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARDING_UNSPECIFIED: _ClassVar[Sharding]
    SHARDING_ROW: _ClassVar[Sharding]
    SHARDING_DIM: _ClassVar[Sharding]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
SHARDING_UNSPECIFIED: Sharding
SHARDING_ROW: Sharding
SHARDING_DIM: Sharding

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GatherRequest(_message.Message):
    __slots__ = ("table_id", "table_version", "indices", "offsets", "blocks", "weights", "pre_input")
    TABLE_ID_FIELD_NUMBER: _ClassVar[int]
    TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PRE_INPUT_FIELD_NUMBER: _ClassVar[int]
    table_id: str
    table_version: str
    indices: Tensor
    offsets: Tensor
    blocks: Tensor
    weights: Tensor
    pre_input: Tensor
    def __init__(self, table_id: _Optional[str] = ..., table_version: _Optional[str] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ..., offsets: _Optional[_Union[Tensor, _Mapping]] = ..., blocks: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., pre_input: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GatherReply(_message.Message):
    __slots__ = ("table_id", "table_version", "shard_index", "pooled")
    TABLE_ID_FIELD_NUMBER: _ClassVar[int]
    TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    table_id: str
    table_version: str
    shard_index: int
    pooled: Tensor
    def __init__(self, table_id: _Optional[str] = ..., table_version: _Optional[str] = ..., shard_index: _Optional[int] = ..., pooled: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StreamGatherRequest(_message.Message):
    __slots__ = ("request_id", "gather", "timeout_us")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GATHER_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    gather: GatherRequest
    timeout_us: int
    def __init__(self, request_id: _Optional[int] = ..., gather: _Optional[_Union[GatherRequest, _Mapping]] = ..., timeout_us: _Optional[int] = ...) -> None: ...

class StreamGatherReply(_message.Message):
    __slots__ = ("request_id", "gather", "code", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GATHER_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    gather: GatherReply
    code: int
    message: str
    def __init__(self, request_id: _Optional[int] = ..., gather: _Optional[_Union[GatherReply, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("table_id", "n_rows", "dv", "expansion", "num_cores", "d_model", "topm", "heads", "merged", "sharding", "row_lo", "row_hi", "col_lo", "col_hi", "out_width", "storage_dtype", "pre_vdim")
    TABLE_ID_FIELD_NUMBER: _ClassVar[int]
    N_ROWS_FIELD_NUMBER: _ClassVar[int]
    DV_FIELD_NUMBER: _ClassVar[int]
    EXPANSION_FIELD_NUMBER: _ClassVar[int]
    NUM_CORES_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    TOPM_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    SHARDING_FIELD_NUMBER: _ClassVar[int]
    ROW_LO_FIELD_NUMBER: _ClassVar[int]
    ROW_HI_FIELD_NUMBER: _ClassVar[int]
    COL_LO_FIELD_NUMBER: _ClassVar[int]
    COL_HI_FIELD_NUMBER: _ClassVar[int]
    OUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    STORAGE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PRE_VDIM_FIELD_NUMBER: _ClassVar[int]
    table_id: str
    n_rows: int
    dv: int
    expansion: int
    num_cores: int
    d_model: int
    topm: int
    heads: int
    merged: bool
    sharding: Sharding
    row_lo: int
    row_hi: int
    col_lo: int
    col_hi: int
    out_width: int
    storage_dtype: DType
    pre_vdim: int
    def __init__(self, table_id: _Optional[str] = ..., n_rows: _Optional[int] = ..., dv: _Optional[int] = ..., expansion: _Optional[int] = ..., num_cores: _Optional[int] = ..., d_model: _Optional[int] = ..., topm: _Optional[int] = ..., heads: _Optional[int] = ..., merged: _Optional[bool] = ..., sharding: _Optional[_Union[Sharding, str]] = ..., row_lo: _Optional[int] = ..., row_hi: _Optional[int] = ..., col_lo: _Optional[int] = ..., col_hi: _Optional[int] = ..., out_width: _Optional[int] = ..., storage_dtype: _Optional[_Union[DType, str]] = ..., pre_vdim: _Optional[int] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("shard_index", "num_shards", "table_version", "model_id", "config_hash", "tables", "max_batch", "max_per_query", "max_message_bytes", "schema_version", "gather_stream")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_QUERY_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    GATHER_STREAM_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    num_shards: int
    table_version: str
    model_id: str
    config_hash: str
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    max_batch: int
    max_per_query: int
    max_message_bytes: int
    schema_version: int
    gather_stream: bool
    def __init__(self, shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., table_version: _Optional[str] = ..., model_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., max_batch: _Optional[int] = ..., max_per_query: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., schema_version: _Optional[int] = ..., gather_stream: _Optional[bool] = ...) -> None: ...
