"""lpl-jax: latent diffusion with the latent perceptual loss, in JAX/Flax."""

import setuptools

setuptools.setup(
    name='lpl_jax',
    version='0.1.0',
    description='Latent perceptual loss (Berrada et al., ICLR 2025) and a TPU-first latent diffusion trainer in JAX.',
    packages=setuptools.find_packages(include=['lpl_jax', 'lpl_jax.*', 'configs']),  # configs: the experiment files
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10.2,<0.11',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'grain>=0.2.18',
        'ml_collections>=1.1.0',
        'tensorflow-datasets>=4.9.10',
        'chex>=0.1.92',
        'numpy>=2.0',
        'scipy>=1.14',  # t quantiles of the comparison's intervals, the normal quantile of the timestep samplers
        'ml_dtypes>=0.6.0',
        'safetensors>=0.8.0',
        'pillow>=11.0',
        'tqdm>=4.67',
        'tensorboardX>=2.6',  # TensorBoard event files without TensorFlow
        'matplotlib>=3.10',
        'scikit-image>=0.26.0',  # ships the photographs of the embedded default data set
    ],
    extras_require={
        # Parity tests compare against diffusers' PyTorch modules, pytorch-fid (Inception, Frechet distance) and prdc.
        # torch and torchvision are pinned as an exact pair: pytorch-fid needs torchvision, and PyPI's torchvision
        # fails to import beside the 2.13.0 CPU build ('operator torchvision::nms does not exist'); 2.14.1 + 0.29.1
        # is a matching pair (a CUDA build, ~5.5 GB, run on the CPU here).
        # pytest-xdist runs the suite on two processes (make test, .ci/run).
        'test': ['pytest>=9.0', 'pytest-xdist>=3.8', 'ruff>=0.17', 'torch==2.14.1', 'torchvision==0.29.1', 'pytorch-fid==0.3.0',
                 'prdc==0.2', 'diffusers>=0.42.1',
                 # The notebooks are executed by the test suite.
                 'nbclient>=0.10', 'nbformat>=5.10', 'ipykernel>=6.29'],
    },
)
