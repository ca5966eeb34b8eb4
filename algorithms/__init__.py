"""Pure training math and data: losses, advantages, datum building, chat rendering, datasets."""
