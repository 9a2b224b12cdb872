"""Real-data formats on local disk -> TFDS array_record data sets in the shared record schema.

One `prepare_<format>(src, data_dir, name=..., **knobs)` per format, each returning
{split: SplitReport} (entries read, written, skipped by reason, first bad locations), which is
also stored with the data set (`read_reports`). The CLI is `python -m pretzel_jax.data.formats`.

| format        | source                                   | builder / read as               |
|---------------|------------------------------------------|---------------------------------|
| webdataset    | tar shards, key.jpg + key.txt/.json      | webdataset_captions/<name>      |
| llava         | LLaVA conversation .json/.jsonl + images | llava_conversations/<name>      |
| interleaved   | OBELICS-style JSONL + images             | interleaved_documents/<name>    |
| edits         | {source, instruction, target} JSONL      | edit_triplets/<name>            |

Read with `tfds.data_source("<builder>/<name>", data_dir=..., split=...)` and
`pretzel_jax.data.schema.decode_record`.
"""

from pretzel_jax.data.formats import edits, interleaved, llava, webdataset
from pretzel_jax.data.formats.common import (
    REASONS,
    BadRecordsError,
    SplitReport,
    read_reports,
)
from pretzel_jax.data.formats.edits import prepare_edits
from pretzel_jax.data.formats.interleaved import prepare_interleaved
from pretzel_jax.data.formats.llava import prepare_llava
from pretzel_jax.data.formats.webdataset import prepare_webdataset

# format -> prepare function (see the table above).
FORMATS = {
    "webdataset": prepare_webdataset,
    "llava": prepare_llava,
    "interleaved": prepare_interleaved,
    "edits": prepare_edits,
}
# format -> TFDS builder name; a data set is read as "<builder name>/<name>".
BUILDER_NAMES = {
    "webdataset": webdataset.NAME,
    "llava": llava.NAME,
    "interleaved": interleaved.NAME,
    "edits": edits.NAME,
}

__all__ = [
    "BUILDER_NAMES",
    "FORMATS",
    "REASONS",
    "BadRecordsError",
    "SplitReport",
    "prepare_edits",
    "prepare_interleaved",
    "prepare_llava",
    "prepare_webdataset",
    "read_reports",
]
