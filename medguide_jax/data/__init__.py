"""Data layer: TFDS sources read per process, grain pipelines, transforms, synthetic sets."""
