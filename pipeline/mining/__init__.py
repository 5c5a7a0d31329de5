"""Mining P/A/N sets on seeded batches: batch plans, the criteria and engines, shards and their recovery, the mine and export stages."""
