"""One module per command (`python main.py COMMAND`): the training jobs (`pretrain`, `finetune`,
`linprobe`, `parts train`) are hooks on `semmae_jax.train.skeleton`; the others are thin commands over
the library (`visualize`, `features` and `knn`, `parts export/show/eval`, `prepare`, `launch`)."""
