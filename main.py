"""semmae-jax command line: `python main.py {pretrain,finetune,eval,linprobe,convert,parity,parts} ...`."""

from semmae_jax.cli import main

if __name__ == "__main__":
    main()
