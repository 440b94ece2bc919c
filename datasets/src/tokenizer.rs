//! Word-level caption tokenizer, trained with the Hugging Face `tokenizers` crate and saved as a
//! standard `tokenizer.json` so the runtime (and Python users) can load the very same file.
//!
//! Pipeline: `Lowercase` normaliser → `Whitespace` pre-tokeniser (splits on whitespace and
//! separates punctuation) → `WordLevel` model with `[UNK]` for unseen words. No post-processor:
//! [`encode_caption`] adds `[BOS]`/`[EOS]` itself so the ids match the model contract
//! (docs/ARCHITECTURE.md: `[PAD]`=0, `[BOS]`=1, `[EOS]`=2, `[UNK]`=3) whatever the file says.

use std::path::{Path, PathBuf};

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::wordlevel::{WordLevel, WordLevelTrainer};
use tokenizers::normalizers::{Lowercase, NormalizerWrapper};
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

/// Padding id; also what the loss ignores.
pub const PAD_ID: u32 = 0;
/// Start-of-caption id, the first decoder input.
pub const BOS_ID: u32 = 1;
/// End-of-caption id; decoding stops here.
pub const EOS_ID: u32 = 2;
/// Id of words not in the vocabulary.
pub const UNK_ID: u32 = 3;

/// Special tokens in id order: the trainer assigns ids by position in this list.
pub const SPECIAL_TOKENS: [(&str, u32); 4] = [
    ("[PAD]", PAD_ID),
    ("[BOS]", BOS_ID),
    ("[EOS]", EOS_ID),
    ("[UNK]", UNK_ID),
];

/// Errors from training, saving, loading or using a caption tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("no training captions")]
    EmptyCorpus,
    #[error("tokenizer: {0}")]
    Tokenizers(#[source] tokenizers::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Read(#[from] duet_fsio::ReadError),
    #[error(
        "{}: a single-file bundle; take its tokenizer from a folder (`duet-export unpack` it, \
         or `duet-export import` it as a run)", path.display()
    )]
    Archive { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("special token {token} has id {found:?}, the model contract requires {expected}")]
    SpecialTokenId {
        token: &'static str,
        expected: u32,
        found: Option<u32>,
    },
    #[error("extending the vocabulary: {0}")]
    Extend(String),
    #[error("caption needs {len} tokens including [BOS]/[EOS], more than max_len {max_len}")]
    TooLong { len: usize, max_len: usize },
}

/// Trains a word-level tokenizer on `captions`.
///
/// The vocabulary is the special tokens (ids 0..4, fixed) followed by every word seen, ordered
/// by decreasing frequency then alphabetically, so training is deterministic. No minimum
/// frequency: ShapeWorld's vocabulary is tiny and every word matters.
pub fn train_tokenizer(captions: &[String]) -> Result<Tokenizer, TokenizerError> {
    if captions.is_empty() {
        return Err(TokenizerError::EmptyCorpus);
    }
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|(t, _)| AddedToken::from(*t, true))
        .collect();
    let mut trainer = WordLevelTrainer::builder()
        .show_progress(false)
        .min_frequency(0)
        .vocab_size(usize::MAX)
        .special_tokens(specials)
        .build()
        .map_err(|e| TokenizerError::Tokenizers(Box::new(e)))?;
    let model = WordLevel::builder()
        .unk_token("[UNK]".to_string())
        .build()
        .map_err(TokenizerError::Tokenizers)?;
    let mut tokenizer = TokenizerBuilder::<
        WordLevel,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(model)
    .with_normalizer(Some(Lowercase.into()))
    .with_pre_tokenizer(Some(Whitespace {}.into()))
    .build()
    .map_err(TokenizerError::Tokenizers)?;
    tokenizer
        .train(&mut trainer, captions.iter())
        .map_err(TokenizerError::Tokenizers)?;
    let tokenizer = Tokenizer::from(tokenizer);
    check_special_ids(&tokenizer)?;
    Ok(tokenizer)
}

/// Verifies that the special tokens have the ids the model contract fixes.
pub fn check_special_ids(tokenizer: &Tokenizer) -> Result<(), TokenizerError> {
    for (token, expected) in SPECIAL_TOKENS {
        let found = tokenizer.token_to_id(token);
        if found != Some(expected) {
            return Err(TokenizerError::SpecialTokenId {
                token,
                expected,
                found,
            });
        }
    }
    Ok(())
}

/// Vocabulary size including special tokens (the model's `vocab_size`).
pub fn vocab_size(tokenizer: &Tokenizer) -> usize {
    tokenizer.get_vocab_size(true)
}

/// Saves as Hugging Face `tokenizer.json` (pretty-printed), atomically: written to a temp file
/// in the same directory and renamed, so a reader never sees half a file.
pub fn save_tokenizer(tokenizer: &Tokenizer, path: &Path) -> Result<(), TokenizerError> {
    let json = tokenizer
        .to_string(true)
        .map_err(TokenizerError::Tokenizers)?;
    duet_fsio::write_atomic_creating_dir(path, json.as_bytes()).map_err(|source| {
        TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// The file name of a tokenizer in a run or bundle folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Largest `tokenizer.json` read (word-level vocabularies of 100k words are ~3 MB).
pub const TOKENIZER_FILE_CAP: duet_fsio::Cap = duet_fsio::Cap::new(64 << 20, "a tokenizer.json");

/// Loads a `tokenizer.json` (a regular file under [`TOKENIZER_FILE_CAP`]) and checks the
/// special-token ids, so a file from elsewhere cannot silently shift `[BOS]`/`[EOS]`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, TokenizerError> {
    let bytes = duet_fsio::read_capped(path, TOKENIZER_FILE_CAP, duet_fsio::Follow::Yes)?;
    tokenizer_from_bytes(&bytes, path)
}

/// [`load_tokenizer`] on bytes already read (and hashed) from `path`.
pub fn tokenizer_from_bytes(bytes: &[u8], path: &Path) -> Result<Tokenizer, TokenizerError> {
    let tokenizer = Tokenizer::from_bytes(bytes).map_err(|source| TokenizerError::Load {
        path: path.to_path_buf(),
        source,
    })?;
    check_special_ids(&tokenizer)?;
    Ok(tokenizer)
}

/// A tokenizer taken from another run or bundle, and the bytes' identity.
pub struct ReusedTokenizer {
    pub tokenizer: Tokenizer,
    /// The file read: `path` itself, or its `tokenizer.json` when `path` is a folder.
    pub file: PathBuf,
    /// Lowercase hex sha256 of the bytes the tokenizer was loaded from.
    pub sha256: String,
}

/// Reads the `tokenizer.json` at `path`, or inside `path` when it is a run or bundle folder:
/// read once, hashed and loaded from those bytes. A single-file bundle is refused with what
/// to do instead.
pub fn reuse_tokenizer(path: &Path) -> Result<ReusedTokenizer, TokenizerError> {
    use sha2::Digest;
    let file = if path.is_dir() {
        path.join(TOKENIZER_FILE)
    } else {
        path.to_path_buf()
    };
    let bytes = duet_fsio::read_capped(&file, TOKENIZER_FILE_CAP, duet_fsio::Follow::Yes)?;
    // A tar archive says `ustar` at byte 257 (POSIX and GNU forms both).
    if bytes.get(257..262) == Some(b"ustar".as_slice()) {
        return Err(TokenizerError::Archive { path: file });
    }
    let tokenizer = tokenizer_from_bytes(&bytes, &file)?;
    let sha256 = format!("{:x}", sha2::Sha256::digest(&bytes));
    Ok(ReusedTokenizer {
        tokenizer,
        file,
        sha256,
    })
}

/// The words of `texts` that `tokenizer` maps to `[UNK]` (lowercased, as its normaliser
/// does) with their counts, most frequent first and then alphabetically: what
/// [`extend_vocabulary`] would add for a fine-tune on those texts.
pub fn unknown_words(
    tokenizer: &Tokenizer,
    texts: &[String],
) -> Result<Vec<(String, usize)>, TokenizerError> {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for text in texts {
        let enc = tokenizer
            .encode(text.as_str(), false)
            .map_err(TokenizerError::Tokenizers)?;
        for (id, &(start, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            if *id == UNK_ID {
                // The offsets give back the word that became `[UNK]`.
                if let Some(word) = text.get(start..end) {
                    *counts.entry(word.to_lowercase()).or_default() += 1;
                }
            }
        }
    }
    let mut words: Vec<(String, usize)> = counts.into_iter().collect();
    words.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(words)
}

/// `tokenizer` with `words` appended to its vocabulary in order, at the ids after its last:
/// every text it encoded before encodes to the same ids, and the model's embedding tables
/// grow by as many rows (`duet-train extend-vocab`). Words it already has are refused.
pub fn extend_vocabulary(
    tokenizer: &Tokenizer,
    words: &[String],
) -> Result<Tokenizer, TokenizerError> {
    // Edited through the `tokenizer.json` form: the `tokenizers` crate builds a `WordLevel`
    // model only from a hash map type it does not re-export, and the file format is the
    // stable, documented interface (the same file the runtime and Python load).
    let invalid = TokenizerError::Extend;
    let json = tokenizer
        .to_string(false)
        .map_err(TokenizerError::Tokenizers)?;
    let mut value: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| invalid(e.to_string()))?;
    let vocab = value
        .pointer_mut("/model/vocab")
        .and_then(|v| v.as_object_mut())
        .ok_or_else(|| invalid("not a word-level tokenizer (no model.vocab)".into()))?;
    let first = vocab_size(tokenizer) as u64;
    for (next, word) in (first..).zip(words) {
        let normal = word.to_lowercase();
        if normal.is_empty() || normal.split_whitespace().count() != 1 || normal != *word {
            return Err(invalid(format!(
                "{word:?} is not one lowercase word; only whole words join the vocabulary"
            )));
        }
        if vocab.insert(normal, next.into()).is_some() {
            return Err(invalid(format!("{word:?} is already in the vocabulary")));
        }
    }
    let extended: Tokenizer = serde_json::to_string(&value)
        .map_err(|e| invalid(e.to_string()))?
        .parse()
        .map_err(TokenizerError::Tokenizers)?;
    check_special_ids(&extended)?;
    Ok(extended)
}

/// Encodes a caption as `[BOS] ids… [EOS]`, failing if that exceeds `max_len` (the decoder's
/// position table); captions are never silently truncated.
///
/// Special-token strings typed inside the text (e.g. a literal "[EOS]") become `[UNK]`, so a
/// caption can never end itself early or inject padding.
pub fn encode_caption(
    tokenizer: &Tokenizer,
    text: &str,
    max_len: usize,
) -> Result<Vec<u32>, TokenizerError> {
    let encoding = tokenizer
        .encode(text, false)
        .map_err(TokenizerError::Tokenizers)?;
    let body = encoding.get_ids();
    let len = body.len() + 2;
    if len > max_len {
        return Err(TokenizerError::TooLong { len, max_len });
    }
    let mut ids = Vec::with_capacity(len);
    ids.push(BOS_ID);
    ids.extend(body.iter().map(|&id| match id {
        PAD_ID | BOS_ID | EOS_ID => UNK_ID,
        other => other,
    }));
    ids.push(EOS_ID);
    Ok(ids)
}

/// Decodes model output: stops at the first `[EOS]`, skips `[BOS]` and `[PAD]`, joins words
/// with single spaces. Unknown ids (outside the vocabulary) render as `[UNK]`. Infallible so
/// metrics never lose a prediction to a decoding error.
pub fn decode_caption(tokenizer: &Tokenizer, ids: &[u32]) -> String {
    ids.iter()
        .copied()
        .take_while(|&id| id != EOS_ID)
        .filter(|&id| id != BOS_ID && id != PAD_ID)
        .map(|id| tokenizer.id_to_token(id).unwrap_or_else(|| "[UNK]".into()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapeworld::{caption, generate_scene, SceneConfig};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::fs;

    fn captions(n: usize, seed: u64) -> Vec<String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| caption(&generate_scene(&mut rng, &SceneConfig::default())))
            .collect()
    }

    #[test]
    fn special_ids_are_fixed() {
        let tok = train_tokenizer(&captions(200, 1)).unwrap();
        for (t, id) in SPECIAL_TOKENS {
            assert_eq!(tok.token_to_id(t), Some(id), "{t}");
            assert_eq!(tok.id_to_token(id).as_deref(), Some(t));
        }
        // 4 specials + a, and, the, at, on, in + 2 sizes + 8 colours + 5 shapes
        // + top, bottom, left, right, centre.
        assert_eq!(vocab_size(&tok), 4 + 6 + 2 + 8 + 5 + 5);
    }

    #[test]
    fn round_trip_generated_captions() {
        let tok = train_tokenizer(&captions(500, 2)).unwrap();
        for c in captions(500, 3) {
            let ids = encode_caption(&tok, &c, 48).unwrap();
            assert_eq!(ids[0], BOS_ID);
            assert_eq!(*ids.last().unwrap(), EOS_ID);
            assert!(!ids[1..ids.len() - 1].contains(&UNK_ID));
            assert_eq!(decode_caption(&tok, &ids), c);
            // Padding after EOS and garbage after EOS are ignored.
            let mut padded = ids.clone();
            padded.extend([PAD_ID, 7, 9, PAD_ID]);
            assert_eq!(decode_caption(&tok, &padded), c);
        }
    }

    #[test]
    fn unknown_words_and_case() {
        let tok = train_tokenizer(&captions(200, 4)).unwrap();
        let ids = encode_caption(&tok, "a Small MAGENTA circle [EOS] [PAD]", 48).unwrap();
        assert_eq!(ids.len(), 8);
        assert_eq!(ids[2], tok.token_to_id("small").unwrap());
        assert_eq!(ids[3], UNK_ID);
        assert_eq!(&ids[5..], &[UNK_ID, UNK_ID, EOS_ID]);
        assert_eq!(
            decode_caption(&tok, &ids),
            "a small [UNK] circle [UNK] [UNK]"
        );
        assert_eq!(decode_caption(&tok, &[BOS_ID, 100_000, EOS_ID]), "[UNK]");
        assert_eq!(decode_caption(&tok, &[]), "");
    }

    #[test]
    fn too_long_is_an_error() {
        let tok = train_tokenizer(&captions(50, 5)).unwrap();
        assert!(matches!(
            encode_caption(&tok, "a b c", 4),
            Err(TokenizerError::TooLong { len: 5, max_len: 4 })
        ));
        assert!(encode_caption(&tok, "a b c", 5).is_ok());
        assert!(matches!(
            train_tokenizer(&[]),
            Err(TokenizerError::EmptyCorpus)
        ));
    }

    #[test]
    fn save_load_identical_and_hf_format() {
        let tok = train_tokenizer(&captions(300, 6)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        save_tokenizer(&tok, &path).unwrap();
        let loaded = load_tokenizer(&path).unwrap();
        for c in captions(100, 7) {
            assert_eq!(
                encode_caption(&tok, &c, 48).unwrap(),
                encode_caption(&loaded, &c, 48).unwrap()
            );
        }
        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["model"]["type"], "WordLevel");
        assert_eq!(json["model"]["unk_token"], "[UNK]");
        assert_eq!(json["model"]["vocab"]["[BOS]"], 1);
        assert_eq!(json["normalizer"]["type"], "Lowercase");
        assert_eq!(json["pre_tokenizer"]["type"], "Whitespace");
        assert_eq!(json["added_tokens"][2]["content"], "[EOS]");
        assert_eq!(json["added_tokens"][2]["id"], 2);
        // Training is deterministic: same captions → byte-identical file.
        let path2 = dir.path().join("again.json");
        save_tokenizer(&train_tokenizer(&captions(300, 6)).unwrap(), &path2).unwrap();
        assert_eq!(fs::read(&path).unwrap(), fs::read(&path2).unwrap());
        // Only the two tokenizer files remain (no temp files).
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn load_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        assert!(matches!(
            load_tokenizer(&path),
            Err(TokenizerError::Read(duet_fsio::ReadError::NotFound { .. }))
        ));
        fs::write(&path, "{ not json").unwrap();
        assert!(matches!(
            load_tokenizer(&path),
            Err(TokenizerError::Load { .. })
        ));
        // A valid HF tokenizer with other special ids is refused.
        let vocab = [("[UNK]".to_string(), 0), ("a".to_string(), 1)]
            .into_iter()
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        Tokenizer::new(model).save(&path, false).unwrap();
        assert!(matches!(
            load_tokenizer(&path),
            Err(TokenizerError::SpecialTokenId { .. })
        ));
    }

    #[test]
    fn a_reused_tokenizer_is_hashed_on_the_bytes_it_was_loaded_from() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKENIZER_FILE);
        save_tokenizer(&train_tokenizer(&captions(50, 1)).unwrap(), &path).unwrap();
        let bytes = fs::read(&path).unwrap();
        // A folder holding one and the file itself are the same tokenizer.
        for given in [dir.path(), path.as_path()] {
            let reused = reuse_tokenizer(given).unwrap();
            assert_eq!(reused.file, path);
            assert_eq!(reused.sha256, format!("{:x}", sha2::Sha256::digest(&bytes)));
            assert_eq!(
                reused.tokenizer.get_vocab_size(true),
                load_tokenizer(&path).unwrap().get_vocab_size(true)
            );
        }
        // A single-file bundle (a tar archive) says what to do instead.
        let archive = dir.path().join("model.duet");
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, TOKENIZER_FILE, bytes.as_slice())
            .unwrap();
        fs::write(&archive, tar.into_inner().unwrap()).unwrap();
        let err = reuse_tokenizer(&archive).err().unwrap();
        assert!(matches!(err, TokenizerError::Archive { .. }), "{err}");
        assert!(err.to_string().contains("duet-export unpack"), "{err}");
    }
}
