"""Command-line tools that act on runs and data, outside any training run: the report over seeds (`tools.report`),
the MeLa study driver (`tools.pipeline`), the studies make runs (`tools.study`), the data downloads
(`tools.download`), the table of meta_eval runs (`tools.fewshot_table`) and the generated key tables and --help
(`tools.config_docs`). They may import every other layer; nothing imports them."""
