"""rlhf_jax: the InstructGPT recipe (SFT, K-way reward model, PPO/PPO-ptx) in JAX."""
from setuptools import find_packages, setup

setup(
    name='rlhf_jax',
    version='0.1.0',
    description='InstructGPT-style RLHF (SFT, reward model, PPO, PPO-ptx) in JAX',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=find_packages(include=['rlhf_jax', 'rlhf_jax.*', 'experiments']),
    install_requires=[
        'jax>=0.7',
        'flax>=0.10',
        'optax>=0.2',
        'orbax-checkpoint>=0.11',
        'tensorflow-datasets>=4.9',  # builders read as array_record; TensorFlow is not needed
        'array-record>=0.5',
        'grain>=0.2',
        'ml-collections>=1.0',
        'numpy>=1.26',
        'regex>=2023.0',           # GPT-2 pre-tokenisation (\p{L}, \p{N})
        'tokenizers>=0.15',        # Hugging Face tokenizer.json
        'sentencepiece>=0.2',
        'safetensors>=0.4',
        'tqdm>=4.0',
        'tensorboardX>=2.6',       # TensorBoard event files without TensorFlow
        'absl-py>=1.0',
        'matplotlib>=3.7',         # the report's plots
    ],
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3'],
        'tpu': ['jax[tpu]>=0.7', 'gcsfs'],  # launch/tpu.py installs this on every worker; gcsfs: gs:// workdirs
        'cuda12': ['jax[cuda12]>=0.7'],  # GPU nodes (launch/slurm.py)
    },
)
