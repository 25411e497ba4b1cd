"""What two or more stages share: id spaces, audio constants, stage tensor contracts, config, logging."""
