"""SDFT training entry point.

    launch/run.sh --num_gpus 8 launch/train.py --config launch/recipes/quickstart.yaml [--field value ...]

Single node, multi-node (hostfile or SLURM) and CPU runs all go through here; see launch/README.md.
"""

from sdft_ds.cli import main

if __name__ == "__main__":
    main()
