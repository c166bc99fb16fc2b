"""timm-lambda: Vision Transformers whose attention layers are removed where an MLP can take over.

Importing the package registers the lambda architectures in timm.
"""
from .models import (
    LambdaVisionTransformer,
    LambdaVisionTransformerDistilled,
    MlpOnlyBlock,
    checkpoint_filter_fn,
    create_lambda_model,
    parse_layers,
    validate_layers,
)
from .token_merging import MergingBlock, apply_token_merging, merge_schedule

__version__ = '0.1.0'
