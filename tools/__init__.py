"""Command-line tools that act on runs and data, outside any training run: the report over seeds (`tools.report`),
the MeLa study driver (`tools.pipeline`), the data downloads (`tools.download`) and the table of meta_eval runs
(`tools.fewshot_table`). They may import every other layer; nothing imports them."""
