"""Pass 2's built-in stages, in pipeline order, each declared as a ``StageSpec``
(engine/core/registry.py): what it reads and writes, whether it replicates per device and what its
models need. The pipeline (engine/core/pipeline.py) knows them only through this table; plugins
(an ``engine.stages.expert.Expert`` under the entry-point group ``densefusion.experts``) join it.
"""

from __future__ import annotations

from engine.core.registry import StageSpec, evidence_kinds
from engine.evidence.kinds import BOXES, OCR, TAGS
from engine.stages import caption, category, decode, detect, ocr, probe, prompt, qc, score, tag


def prompt_evidence() -> tuple[str, ...]:
    """What the fusion prompt shows: the paper's boxes and OCR, and every plugin kind with a section."""
    return (BOXES.name, OCR.name, *(kind.name for kind in evidence_kinds().values() if kind.prompt is not None))


STAGES = (
    StageSpec("probe", probe.build, always=True),  # fills width/height, which every later stage relies on
    StageSpec("decode", decode.build, decoder=True, memory=decode.decode_need),
    StageSpec("category", category.build, uses=("embedding",), writes=("embedding",), replicate=True,
              memory=category.category_need),  # leaves the embedding on the sample for the clip tagger
    StageSpec("tag", tag.build, uses=("embedding",), writes=(TAGS.name,), replicate=True, memory=tag.tag_need),
    StageSpec("detect", detect.build, uses=(TAGS.name,), writes=(BOXES.name,), replicate=True,
              memory=detect.detect_need),  # OWLv2 is queried with the tags
    StageSpec("ocr", ocr.build, writes=(OCR.name,), replicate=True, memory=ocr.ocr_need),
    StageSpec("prompt", prompt.build, uses=prompt_evidence, writes=("prompt",)),
    StageSpec("caption", caption.build, reads=("prompt",), writes=("caption",), replicate=caption.replicated,
              rest=caption.caption_need, resolve=caption.settled),
    StageSpec("qc", qc.build, uses=("caption",), writes=("flags",)),
    StageSpec("score", score.build, uses=("caption", TAGS.name, BOXES.name, OCR.name), writes=("scores",)),
)
