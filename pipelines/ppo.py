"""Run one 'ppo' stage of a prepared run directory; the script `accelerate launch` runs for multi-GPU.

    python pipelines/osp.py --stage-dir runs/<run>/<stage> [--resume]
"""

from alignpipe.pipeline.stage import main

if __name__ == "__main__":
    main("ppo")
