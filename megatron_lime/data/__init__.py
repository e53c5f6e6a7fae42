"""Data: Megatron-LM's indexed datasets, the corpus reader, preprocessing, and the datasets the trainer reads
(README.md here draws the pipeline). Layer 3 of the package (ARCHITECTURE.md): it imports the tokenizer and the
ground floor, never checkpoint, model or training.

    readers.py          the one corpus reader (JSONL, JSON, parquet, `datasets` folders, text) for pretraining
                        and SFT: find_inputs, iter_rows; every bad file or row is a BadRecordError
    filters.py          --filter expressions on records
    shards.py           which input files one preprocessing job of many takes
    preprocess.py       corpus -> PREFIX_text_document.bin/.idx (tools/preprocess_data.py)
    indexed_dataset.py  the .bin/.idx format, byte for byte: writer and memory-mapped reader
    merge.py            many .bin/.idx pairs -> one (tools/merge_datasets.py)
    gpt_dataset.py      packed, shuffled GPT samples (the index builders are the compiled helpers: native.py)
    builder.py          build_datasets: the one entry point, GPT or SFT, blended, split
    sft/                instruction data: adapters, template, mixture, preprocessing, packed SFT datasets
"""
