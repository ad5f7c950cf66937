from setuptools import find_namespace_packages, find_packages, setup

# kernels/ is installed as cmae_ds.kernels: a bare top-level `kernels` would collide with an unrelated PyPI package.
# Namespace discovery so that the data-only folders (presets, embedded photos) are packages too.
PACKAGES = (
    find_namespace_packages(include=['cmae_ds', 'cmae_ds.*'], exclude=['*.__pycache__'])
    + ['cmae_ds.kernels']
    + ['cmae_ds.kernels.' + name for name in find_packages('kernels')]
)

setup(
    name='cmae_ds',
    version='0.1.0',
    description='CMAE (Contrastive Masked Autoencoders) pretraining, fine-tuning and evaluation under DeepSpeed',
    python_requires='>=3.10',
    packages=PACKAGES,
    package_dir={'cmae_ds.kernels': 'kernels'},
    include_package_data=True,
    package_data={'cmae_ds.presets': ['*.yaml'], 'cmae_ds.data.embedded': ['*.jpg', '*.md']},
    install_requires=[
        'torch>=2.4',
        'torchvision',
        'timm>=1.0',
        'safetensors>=0.4',
        'deepspeed>=0.16',
        'pyyaml',
        'tensorboard',
        'tqdm',
        'numpy',
        'pillow',
    ],
    extras_require={
        'dali': ['nvidia-dali-cuda120'],
        'test': [
            'pytest',
            'pytest-xdist',
            'nvidia-dali-cuda120',
            'ruff==0.17.6',
            'webdataset==1.0.2',
            'markdown-it-py',
        ],
    },
)
