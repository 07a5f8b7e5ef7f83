"""Data: tokenizer, sources, sequence layout and grain pipelines (see pipeline.py for the flow).

tokenizer.py      SentencePiece + the official special tokens (<PAD>, <image>, <|im_start|>,
                  <|im_end|> after the base vocabulary); training cached in a directory.
sources.py        MNIST-5k, pydoc prose, plain text files, JSONL chat (random access).
image_sources.py  class-per-folder images (ImageNet layout), image-text JSONL (JourneyDB).
tfds_latents.py   precomputed VAE latents as a TFDS ArrayRecord dataset (no TensorFlow).
sequences.py      samples in the official formats, as model/inputs.py RowBuilder pieces.
chat_format.py    dialogues in the official formats (the chat template), for rows and prompts alike.
llava.py          LLaVA instruction data (llava_v1_5_mix665k.json): conversations about images.
conversations.py  rows of conversations about images (the `understand` steps on LLaVA data).
pipeline.py       shard -> shuffle -> sample -> rows; resumable iterators of NumPy batches.
"""
