"""The data stage: image folders and WebDataset corpora become data sets in object storage, streamed by Ray Data.

- ``prepare``: image folders -> WebDataset shards + manifest (``python -m jobs.prepare_data``)
- ``adopt``: shards made elsewhere -> a manifest naming them where they are (``--adopt``)
- ``dataset``: a data set as an object, its manifest read once
- ``reader``: shards -> Arrow blocks of raw samples (the Ray Data datasource)
- ``augment``: the training augmentation on CPUs (timm's RandAugment, as DeiT)
- ``ingest``: ``read_split``, the Ray Data pipeline (read + decode + augment)
- ``bad_samples``: the per-dataset actor that counts bad samples and tells tasks the epoch
- ``sample``: the built-in procedural sample data set
"""
