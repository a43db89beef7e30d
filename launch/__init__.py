"""Launchers: TPU pod (tpu_pod.sh), SLURM (slurm.sbatch), local multi-process (local.py)."""
