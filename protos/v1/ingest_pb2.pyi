from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OpenRunRequest(_message.Message):
    __slots__ = ("run_name", "resume_run_id", "config", "tags", "world_size", "report_interval_seconds", "agent_version")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_NAME_FIELD_NUMBER: _ClassVar[int]
    RESUME_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    run_name: str
    resume_run_id: str
    config: _containers.ScalarMap[str, str]
    tags: _containers.ScalarMap[str, str]
    world_size: int
    report_interval_seconds: float
    agent_version: str
    def __init__(self, run_name: _Optional[str] = ..., resume_run_id: _Optional[str] = ..., config: _Optional[_Mapping[str, str]] = ..., tags: _Optional[_Mapping[str, str]] = ..., world_size: _Optional[int] = ..., report_interval_seconds: _Optional[float] = ..., agent_version: _Optional[str] = ...) -> None: ...

class OpenRunResponse(_message.Message):
    __slots__ = ("run_id", "run", "last_sequences")
    class LastSequencesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    run: _common_pb2.RunInfo
    last_sequences: _containers.ScalarMap[str, int]
    def __init__(self, run_id: _Optional[str] = ..., run: _Optional[_Union[_common_pb2.RunInfo, _Mapping]] = ..., last_sequences: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ReportBatch(_message.Message):
    __slots__ = ("run_id", "sender_id", "sequence", "samples")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    sender_id: str
    sequence: int
    samples: _containers.RepeatedCompositeFieldContainer[_common_pb2.Sample]
    def __init__(self, run_id: _Optional[str] = ..., sender_id: _Optional[str] = ..., sequence: _Optional[int] = ..., samples: _Optional[_Iterable[_Union[_common_pb2.Sample, _Mapping]]] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("sequence", "outcome", "samples_applied")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[ReportAck.Outcome]
        OUTCOME_APPLIED: _ClassVar[ReportAck.Outcome]
        OUTCOME_DUPLICATE: _ClassVar[ReportAck.Outcome]
    OUTCOME_UNSPECIFIED: ReportAck.Outcome
    OUTCOME_APPLIED: ReportAck.Outcome
    OUTCOME_DUPLICATE: ReportAck.Outcome
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    outcome: ReportAck.Outcome
    samples_applied: int
    def __init__(self, sequence: _Optional[int] = ..., outcome: _Optional[_Union[ReportAck.Outcome, str]] = ..., samples_applied: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("run_id", "sender_id", "step", "wall_time")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    sender_id: str
    step: int
    wall_time: float
    def __init__(self, run_id: _Optional[str] = ..., sender_id: _Optional[str] = ..., step: _Optional[int] = ..., wall_time: _Optional[float] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CloseRunRequest(_message.Message):
    __slots__ = ("run_id", "state")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: _common_pb2.RunState
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.RunState, str]] = ...) -> None: ...

class CloseRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _common_pb2.RunInfo
    def __init__(self, run: _Optional[_Union[_common_pb2.RunInfo, _Mapping]] = ...) -> None: ...
