"""Preprocessing constants the published CrossViT models were trained and evaluated with (DeiT recipe)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Evaluation: resize the short side to input / crop_pct (bicubic), then centre-crop the input size.
EVAL_CROP_PCT = 0.875
EVAL_CROP_PCT_408 = 1.0  # the 408 px models were fine-tuned and are evaluated without a crop margin
INTERPOLATION = "bicubic"


def eval_crop_pct(img_size: int) -> float:
    """The fraction of the resized short side that the centre crop keeps."""
    return EVAL_CROP_PCT_408 if img_size >= 384 else EVAL_CROP_PCT


def eval_resize_size(img_size: int) -> int:
    """Short-side size before the centre crop."""
    return int(img_size / eval_crop_pct(img_size))
