//! Training data: the generated ShapeWorld scenes, the Emoji-CLDR pairs, several folders mixed
//! into one sample list, the tokenizer built from their captions, and the pair tasks of the
//! fusion and restore stages.

pub mod emoji;
pub mod folders;
pub mod pair_tasks;
pub mod shapeworld;
pub mod tokenizer;
