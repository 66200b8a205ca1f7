"""The one error root. Every error cocoa raises on purpose is a :class:`CocoaError`; its message names
the file, record or flag and says what to do, and the CLI prints it as one line (exit 1).

Subclasses, by floor: ``RecordError`` (records), ``ShardError`` (shards), ``UnsafePathError``,
``LockedError``, ``NotOwnedError``, ``TextFileError`` (fs), ``MMEBError`` (sources), ``PromptError``
(prompts), ``TeacherError`` / ``SynthIncomplete`` (datagen), ``CollateError`` (model), ``TrainError``,
``DataError``, ``CheckpointError`` (train), ``EvalError`` (eval).
"""

from __future__ import annotations


class CocoaError(ValueError):
    """A problem the user can fix; the message says which file/record/flag and what to do."""
