"""Where samples come from: folders, file lists, official annotation files and webdataset shards (their index, the
packing that writes them, the scan that finds unreadable images). Nothing here builds a view or a batch."""
