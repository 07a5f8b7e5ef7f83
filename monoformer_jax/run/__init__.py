"""The shared run layer under training, inference and evaluation: the run config and its checks
(`config`), the mesh and sharding rules (`sharding`), the train state and its shardings
(`state`), checkpoints (`checkpoints`), the tokenizer (`tokenizer`), opening a run's newest
weights (`open`), and the images a run writes (`images`)."""
