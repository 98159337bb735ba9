"""The instruction the DenseFusion caption engine was fine-tuned on (paper appendix C.2), word for
word: the fusion prompt (engine/evidence/prompt.py) starts with it, and the tiny caption model's
tokenizer (models/tiny.py) learns its words."""

CAPTION_ENGINE_INSTRUCTION = (
    "You are a powerful multimodal model and you should generate detailed descriptions of this "
    "image, using additional external information such as [Caption], [Detection Box], and [OCR]. "
    "[Caption] might contain rich world knowledge which should be considered in the final "
    "description but also may not have any relevance to the image. Although this information may "
    "contain errors or be incomplete, you should disregard any inaccuracies. External details "
    "like detection boxes are just for reference and should not be included in the final "
    "description. If external information is not used, do not specify why."
)
