"""Training data: folders of images and captions, image loading, aspect-ratio buckets."""

from sdlora.data.buckets import Bucket, assign_bucket, bucket_batches, make_buckets
from sdlora.data.folder import (
    IMAGE_EXTENSIONS,
    DataError,
    Item,
    list_images,
    missing_captions,
    read_caption,
    scan_folder,
)
from sdlora.data.images import ImageError, bucket_fit, fit_to_bucket, load_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "Bucket",
    "DataError",
    "ImageError",
    "Item",
    "assign_bucket",
    "bucket_batches",
    "bucket_fit",
    "fit_to_bucket",
    "list_images",
    "load_image",
    "make_buckets",
    "missing_captions",
    "read_caption",
    "scan_folder",
]
