"""Training the caption engine (paper §3.2.2): LLaVA-NeXT (the paper's) or Qwen2.5-VL fine-tuned
on the meta dataset, one recipe; what differs per family is its ``TrainLayout``
(``models/caption/families.py``).

``config`` (options), ``data`` (records, held-out split, label masking, collation, data order),
``parts`` (which parameters train), ``loop`` (the training loop), ``checkpoints`` (atomic
checkpoints, resume), ``command`` (the ``train`` CLI), ``evaluate`` (base vs fine-tuned vs
GPT-4V on the held-out samples).
"""
