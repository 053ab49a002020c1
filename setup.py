"""Package layout (the metadata lives in pyproject.toml).

The library reads files under configs/: the ZeRO presets (training/ds_config.py), the main job's pipeline
(main_job.py) and the pipeline behind the sbatch templates (pipelines/templates.py). configs/ stays at
the repository root, where users edit it and the README names it; the wheel carries the same tree as
package data, `biomask/configs/`, so a plain `pip install .` trains from any directory.
`biomask.resources` finds whichever copy exists. pyproject.toml cannot map a folder outside the package
into it while also discovering the packages, hence this file.
"""

from setuptools import find_namespace_packages, setup

CONFIG_PACKAGES = [
    "biomask.configs",
    *(f"biomask.configs.{p}" for p in find_namespace_packages(where="configs")),
]

setup(
    packages=[*find_namespace_packages(include=["biomask*"], exclude=["*__pycache__"]), *CONFIG_PACKAGES],
    package_dir={"biomask.configs": "configs"},
    package_data={
        "biomask": ["datasets/*.yaml", "py.typed"],
        **{package: ["*.yaml", "*.json"] for package in CONFIG_PACKAGES},
    },
)
