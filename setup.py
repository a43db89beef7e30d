"""medguide_jax: five medical-imaging methods on one JAX/Flax trainer."""
from setuptools import find_packages, setup

setup(
    name="medguide_jax",
    version="0.1.0",
    description="JAX/Flax research code for deep learning on medical images",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["medguide_jax", "medguide_jax.*", "data_prep", "data_prep.*",
                                    "configs"]),
    install_requires=[
        # jax 0.11+ needs Python 3.12; on 3.10/3.11 pip resolves 0.10.x. Both are admitted.
        "jax>=0.10.0,<0.12",
        "jaxlib>=0.10.0,<0.12",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.12.0,<0.13",
        "grain>=0.2.12,<0.3",
        "tensorflow-datasets>=4.9.9,<5",  # ArrayRecord builders and data_source; no TensorFlow
        "array-record>=0.8.1",
        "ml-collections>=1.1.0,<2",
        "chex>=0.1.90,<0.2",
        "numpy>=1.26,<3",
        "Pillow>=10.0",         # PNG (16-bit), JPEG decoding in grain transforms
        "absl-py>=2.1",
        "etils[epath]>=1.10",   # local and gs:// paths
        "filelock>=3.12",       # one process prepares a synthetic dataset, others wait
        "tensorboardX>=2.6",    # TensorBoard events without TensorFlow
        "psutil>=5.9",          # peak host memory in the benchmark
        "scipy>=1.11",          # mammogram cropping (connected components, erosion)
        "scikit-image>=0.22",   # slides: polygon masks, Otsu's tissue threshold
        "openslide-python>=1.3",  # whole-slide images (.svs, .tif, .ndpi, .mrxs, ...)
        "openslide-bin>=4.0",   # the OpenSlide library itself, as a wheel
        "openpyxl>=3.1",        # BCNB's patient-clinical-data.xlsx
        "matplotlib>=3.7",      # missing_modality: AUC against missing rate (Agg backend)
        "tokenizers>=0.15",     # hybridmed: WordPiece report vocabularies
        "safetensors>=0.4",     # hybridmed: Hugging Face BERT checkpoints, read without torch
        "pycocoevalcap>=1.2",   # hybridmed: COCO's BLEU/ROUGE-L/CIDEr scorers (pure Python; no Java)
        "pycocotools>=2.0.7",   # hybridmed downstream: COCO-style detection AP
    ],
    extras_require={
        # tensorboard: the tests read the event files with TensorBoard's own reader.
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "pydicom>=2.4", "nibabel>=5.0",
                "tensorboard>=2.14", "tifffile>=2023.1"],  # tifffile: pyramidal test slides
        "gpu": ["jax[cuda12]>=0.10.0,<0.12"],
        "tpu": ["jax[tpu]>=0.10.0,<0.12"],
        "dicom": ["pydicom>=2.4"],
        "nifti": ["nibabel>=5.0"],
        "torch": ["torch"],
        # tests/make_bert_fixture.py only: the reference outputs of a Hugging Face BertModel.
        "bert_fixture": ["torch", "transformers>=4.40", "safetensors>=0.4"],
    },
    entry_points={"console_scripts": ["medguide=medguide_jax.main:run"]},
)
