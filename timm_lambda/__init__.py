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

__version__ = '0.1.0'
