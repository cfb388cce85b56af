# The repository keeps kernels/ and train/ at the top level for readability, but installs them as
# cocofast.kernels and cocofast.train so nothing generic lands in site-packages. Subpackages are found under
# each folder, so a non-editable install carries cocofast.data, cocofast.losses, cocofast.models, ... too.
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
LAYOUT = {"cocofast": "cocofast", "cocofast.kernels": "kernels", "cocofast.train": "train"}


def packages_of(layout: dict[str, str]) -> list[str]:
    names = []
    for package, folder in layout.items():
        names.append(package)
        names += [f"{package}.{sub}" for sub in find_packages(str(HERE / folder))]
    return names


setup(packages=packages_of(LAYOUT), package_dir=LAYOUT)
