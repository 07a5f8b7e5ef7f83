"""What the model reads images with: input-image encoders (encoders.py) and the frozen CLIP vision
tower (clip.py, its transformers weights loaded by convert.py); and a whole CLIP for scoring
images against texts (clip_model.py: the text tower of clip_text.py, the projections, the BPE
tokenizer of clip_tokenizer.py)."""

from monoformer_jax.vision.clip import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPVisionConfig,
    CLIPVisionTransformer,
    clip_image_features,
    clip_preprocess,
    clip_vision_outputs,
    init_params,
)
from monoformer_jax.vision.convert import ConversionError, convert_state_dict, load_clip_config, load_clip_vision
