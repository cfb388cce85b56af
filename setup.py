# The repository keeps kernels/ and train/ at the top level for readability, but
# installs them as cocofast.kernels and cocofast.train so nothing generic lands
# in site-packages.
from setuptools import setup

setup(
    packages=["cocofast", "cocofast.kernels", "cocofast.train"],
    package_dir={
        "cocofast": "cocofast",
        "cocofast.kernels": "kernels",
        "cocofast.train": "train",
    },
)
