# The repository keeps kernels/ and train/ at the top level for readability, but installs them as
# cocofast.kernels and cocofast.train so nothing generic lands in site-packages. Subpackages are found under
# each folder, so a non-editable install carries cocofast.data, cocofast.losses, cocofast.models, ... too.
from pathlib import Path

from setuptools import find_namespace_packages, find_packages, setup

HERE = Path(__file__).resolve().parent
# configs/ installs as cocofast.configs: the experiment runner's packaged set-up and tables
# (cocofast.train.experiments.tables finds them there, or in configs/ of a checkout).
LAYOUT = {"cocofast": "cocofast", "cocofast.kernels": "kernels", "cocofast.train": "train",
          "cocofast.configs": "configs"}


# Folders of data files alone: every subfolder is listed as a (namespace) package, so setuptools ships its
# files rather than warning that it would ignore a folder Python could import.
DATA_PACKAGES = {"cocofast.configs"}


def packages_of(layout: dict[str, str]) -> list[str]:
    names = []
    for package, folder in layout.items():
        find = find_namespace_packages if package in DATA_PACKAGES else find_packages
        names.append(package)
        names += [f"{package}.{sub}" for sub in find(str(HERE / folder)) if "__pycache__" not in sub]
    return names


setup(packages=packages_of(LAYOUT), package_dir=LAYOUT,
      package_data={"cocofast.configs": ["*.yaml"], "cocofast.configs.experiments": ["*.yaml"]})
