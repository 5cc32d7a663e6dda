"""The plan of a conversion: what it reads, maps, checks, keeps verbatim and writes, decided once from
the HF config, the checkpoint's tensor names and the plugins' hooks; every executor carries it out."""
