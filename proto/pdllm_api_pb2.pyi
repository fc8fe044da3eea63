from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerationParams(_message.Message):
    __slots__ = ("gen_length", "block_length", "steps", "temperature", "threshold", "mode", "chunk_size", "top_k", "keep_ratio", "remasking", "seed", "scoring", "selected_kv", "instruction", "preset", "keep_question_kv", "chunking")
    GEN_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_LENGTH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    KEEP_RATIO_FIELD_NUMBER: _ClassVar[int]
    REMASKING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    SELECTED_KV_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    KEEP_QUESTION_KV_FIELD_NUMBER: _ClassVar[int]
    CHUNKING_FIELD_NUMBER: _ClassVar[int]
    gen_length: int
    block_length: int
    steps: int
    temperature: float
    threshold: float
    mode: str
    chunk_size: int
    top_k: int
    keep_ratio: float
    remasking: str
    seed: int
    scoring: str
    selected_kv: str
    instruction: str
    preset: str
    keep_question_kv: bool
    chunking: str
    def __init__(self, gen_length: _Optional[int] = ..., block_length: _Optional[int] = ..., steps: _Optional[int] = ..., temperature: _Optional[float] = ..., threshold: _Optional[float] = ..., mode: _Optional[str] = ..., chunk_size: _Optional[int] = ..., top_k: _Optional[int] = ..., keep_ratio: _Optional[float] = ..., remasking: _Optional[str] = ..., seed: _Optional[int] = ..., scoring: _Optional[str] = ..., selected_kv: _Optional[str] = ..., instruction: _Optional[str] = ..., preset: _Optional[str] = ..., keep_question_kv: _Optional[bool] = ..., chunking: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("context", "question", "params", "model", "request_id")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    context: bytes
    question: bytes
    params: GenerationParams
    model: str
    request_id: str
    def __init__(self, context: _Optional[bytes] = ..., question: _Optional[bytes] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ..., model: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerationStats(_message.Message):
    __slots__ = ("mode", "steps", "prefill_chunks", "reused_chunks", "selected_chunks", "context_tokens", "question_tokens", "generated_tokens", "total_seconds", "queue_seconds", "extra")
    MODE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    REUSED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SELECTED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    mode: str
    steps: int
    prefill_chunks: int
    reused_chunks: int
    selected_chunks: int
    context_tokens: int
    question_tokens: int
    generated_tokens: int
    total_seconds: float
    queue_seconds: float
    extra: _struct_pb2.Struct
    def __init__(self, mode: _Optional[str] = ..., steps: _Optional[int] = ..., prefill_chunks: _Optional[int] = ..., reused_chunks: _Optional[int] = ..., selected_chunks: _Optional[int] = ..., context_tokens: _Optional[int] = ..., question_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., total_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., extra: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "answer", "stats")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    answer: str
    stats: GenerationStats
    def __init__(self, request_id: _Optional[str] = ..., answer: _Optional[str] = ..., stats: _Optional[_Union[GenerationStats, _Mapping]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class PrefillProgress(_message.Message):
    __slots__ = ("done_chunks", "total_chunks", "reused_chunks", "context_tokens")
    DONE_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    REUSED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    done_chunks: int
    total_chunks: int
    reused_chunks: int
    context_tokens: int
    def __init__(self, done_chunks: _Optional[int] = ..., total_chunks: _Optional[int] = ..., reused_chunks: _Optional[int] = ..., context_tokens: _Optional[int] = ...) -> None: ...

class DenoiseStep(_message.Message):
    __slots__ = ("step", "total_steps", "partial_text", "unmasked_tokens")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_TEXT_FIELD_NUMBER: _ClassVar[int]
    UNMASKED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    partial_text: str
    unmasked_tokens: int
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., partial_text: _Optional[str] = ..., unmasked_tokens: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("request_id", "queued", "prefill", "step", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    queued: Queued
    prefill: PrefillProgress
    step: DenoiseStep
    final: GenerateResponse
    def __init__(self, request_id: _Optional[str] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., prefill: _Optional[_Union[PrefillProgress, _Mapping]] = ..., step: _Optional[_Union[DenoiseStep, _Mapping]] = ..., final: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class BatchJob(_message.Message):
    __slots__ = ("id", "context", "document_ref", "question", "params")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_REF_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    id: str
    context: bytes
    document_ref: str
    question: bytes
    params: GenerationParams
    def __init__(self, id: _Optional[str] = ..., context: _Optional[bytes] = ..., document_ref: _Optional[str] = ..., question: _Optional[bytes] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("ref", "content")
    REF_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    ref: str
    content: bytes
    def __init__(self, ref: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("batch_id", "jobs", "documents", "default_params")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PARAMS_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    jobs: _containers.RepeatedCompositeFieldContainer[BatchJob]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    default_params: GenerationParams
    def __init__(self, batch_id: _Optional[str] = ..., jobs: _Optional[_Iterable[_Union[BatchJob, _Mapping]]] = ..., documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., default_params: _Optional[_Union[GenerationParams, _Mapping]] = ...) -> None: ...

class BatchStatus(_message.Message):
    __slots__ = ("batch_id", "state", "total", "pending", "running", "done", "failed", "cancelled", "created_unix")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    state: str
    total: int
    pending: int
    running: int
    done: int
    failed: int
    cancelled: int
    created_unix: float
    def __init__(self, batch_id: _Optional[str] = ..., state: _Optional[str] = ..., total: _Optional[int] = ..., pending: _Optional[int] = ..., running: _Optional[int] = ..., done: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ..., created_unix: _Optional[float] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("batch", "created")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    batch: BatchStatus
    created: bool
    def __init__(self, batch: _Optional[_Union[BatchStatus, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("id", "state", "answer", "stats", "error", "attempts")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    answer: str
    stats: GenerationStats
    error: str
    attempts: int
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., answer: _Optional[str] = ..., stats: _Optional[_Union[GenerationStats, _Mapping]] = ..., error: _Optional[str] = ..., attempts: _Optional[int] = ...) -> None: ...

class GetBatchRequest(_message.Message):
    __slots__ = ("batch_id", "include_results", "offset", "limit")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RESULTS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    include_results: bool
    offset: int
    limit: int
    def __init__(self, batch_id: _Optional[str] = ..., include_results: _Optional[bool] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class GetBatchResponse(_message.Message):
    __slots__ = ("batch", "results", "next_offset")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    batch: BatchStatus
    results: _containers.RepeatedCompositeFieldContainer[JobResult]
    next_offset: int
    def __init__(self, batch: _Optional[_Union[BatchStatus, _Mapping]] = ..., results: _Optional[_Iterable[_Union[JobResult, _Mapping]]] = ..., next_offset: _Optional[int] = ...) -> None: ...

class ListBatchesRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListBatchesResponse(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[BatchStatus]
    def __init__(self, batches: _Optional[_Iterable[_Union[BatchStatus, _Mapping]]] = ...) -> None: ...

class CancelBatchRequest(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    def __init__(self, batch_id: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("serving", "detail")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    detail: _struct_pb2.Struct
    def __init__(self, serving: _Optional[bool] = ..., detail: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("name", "model_id", "family", "modes", "max_context_tokens", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_id: str
    family: str
    modes: _containers.RepeatedScalarFieldContainer[str]
    max_context_tokens: int
    detail: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., model_id: _Optional[str] = ..., family: _Optional[str] = ..., modes: _Optional[_Iterable[str]] = ..., max_context_tokens: _Optional[int] = ..., detail: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
