//! The caption grammar (see the module above): the canonical caption of a scene, and parsing
//! one back into objects, strictly or leniently (for a model's imperfect output).

use super::*;

/// Caption of a list of objects, always in canonical cell order (see the module grammar).
pub fn objects_caption(objects: &[Object]) -> String {
    let mut sorted = objects.to_vec();
    sorted.sort_by_key(|o| o.position);
    sorted
        .iter()
        .map(Object::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The caption of a scene, e.g. "a small red circle at the top left and a large blue square in
/// the centre".
pub fn caption(scene: &Scene) -> String {
    objects_caption(&scene.objects)
}

/// Why a caption does not follow the grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty caption")]
    Empty,
    #[error("clause {clause}: expected {expected}, found {found:?} (word {word})")]
    UnexpectedWord {
        clause: usize,
        word: usize,
        expected: &'static str,
        found: String,
    },
    #[error("clause {clause}: expected {expected}, found end of caption")]
    UnexpectedEnd {
        clause: usize,
        expected: &'static str,
    },
}

/// Position phrases as word lists, longest first so "at the top left" wins over "at the top".
fn position_phrases() -> Vec<(Vec<&'static str>, Position)> {
    let mut phrases: Vec<_> = Position::ALL
        .into_iter()
        .map(|p| (p.phrase().split(' ').collect::<Vec<_>>(), p))
        .collect();
    phrases.sort_by_key(|(words, _)| std::cmp::Reverse(words.len()));
    phrases
}

/// Tries to read one clause starting at `words[start]`. Returns the object and the number of
/// words consumed, or the index and description of the first mismatch.
fn parse_clause(
    words: &[&str],
    start: usize,
    phrases: &[(Vec<&'static str>, Position)],
) -> Result<(Object, usize), (usize, &'static str)> {
    let get = |k: usize| words.get(start + k).copied();
    if get(0) != Some("a") {
        return Err((start, "\"a\""));
    }
    let size = get(1)
        .and_then(Size::from_word)
        .ok_or((start + 1, "a size"))?;
    let colour = get(2)
        .and_then(Colour::from_word)
        .ok_or((start + 2, "a colour"))?;
    let shape = get(3)
        .and_then(Shape::from_word)
        .ok_or((start + 3, "a shape"))?;
    let rest = &words[(start + 4).min(words.len())..];
    for (phrase, position) in phrases {
        if rest.len() >= phrase.len() && rest[..phrase.len()] == phrase[..] {
            // "at the top" must not be a prefix of an unrecognised longer phrase like
            // "at the top middle": the next word has to end the clause.
            let next = rest.get(phrase.len()).copied();
            if next.is_none() || next == Some("and") {
                let object = Object {
                    shape,
                    colour,
                    size,
                    position: *position,
                };
                return Ok((object, 4 + phrase.len()));
            }
        }
    }
    Err((start + 4, "a position phrase"))
}

/// Strict inverse of [`caption`]: every word must fit the grammar. Object order is kept as
/// written (not re-sorted) so callers can check canonical order if they care.
pub fn parse_caption(text: &str) -> Result<Vec<Object>, ParseError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.is_empty() {
        return Err(ParseError::Empty);
    }
    let phrases = position_phrases();
    let mut objects = Vec::new();
    let mut i = 0;
    loop {
        let clause = objects.len();
        match parse_clause(&words, i, &phrases) {
            Ok((object, used)) => {
                objects.push(object);
                i += used;
            }
            Err((at, expected)) => {
                return Err(match words.get(at) {
                    Some(found) => ParseError::UnexpectedWord {
                        clause,
                        word: at,
                        expected,
                        found: (*found).to_string(),
                    },
                    None => ParseError::UnexpectedEnd { clause, expected },
                });
            }
        }
        match words.get(i) {
            None => return Ok(objects),
            Some(&"and") => {
                i += 1;
                if i == words.len() {
                    return Err(ParseError::UnexpectedEnd {
                        clause: clause + 1,
                        expected: "\"a\"",
                    });
                }
            }
            Some(found) => {
                return Err(ParseError::UnexpectedWord {
                    clause,
                    word: i,
                    expected: "\"and\" or end of caption",
                    found: (*found).to_string(),
                })
            }
        }
    }
}

/// Tolerant parser for model outputs: returns every well-formed
/// "a SIZE COLOUR SHAPE POSITION" clause found anywhere in `text`, skipping garbage words.
///
/// A clause counts when its position phrase is followed by "and", the end of the text, or
/// anything that is not a longer position phrase (garbage after a clause does not discard it).
/// Never fails; a caption with no recognisable clause yields an empty list.
pub fn parse_caption_lenient(text: &str) -> Vec<Object> {
    let lowered = text.to_lowercase();
    let words: Vec<&str> = lowered.split_whitespace().collect();
    let phrases = position_phrases();
    let mut objects = Vec::new();
    let mut i = 0;
    while i < words.len() {
        match lenient_clause(&words, i, &phrases) {
            Some((object, used)) => {
                objects.push(object);
                i += used;
            }
            None => i += 1,
        }
    }
    objects
}

/// Like [`parse_clause`] but accepts the longest matching position phrase whatever follows.
fn lenient_clause(
    words: &[&str],
    start: usize,
    phrases: &[(Vec<&'static str>, Position)],
) -> Option<(Object, usize)> {
    let get = |k: usize| words.get(start + k).copied();
    if get(0) != Some("a") {
        return None;
    }
    let size = get(1).and_then(Size::from_word)?;
    let colour = get(2).and_then(Colour::from_word)?;
    let shape = get(3).and_then(Shape::from_word)?;
    let rest = &words[(start + 4).min(words.len())..];
    phrases.iter().find_map(|(phrase, position)| {
        (rest.len() >= phrase.len() && rest[..phrase.len()] == phrase[..]).then_some((
            Object {
                shape,
                colour,
                size,
                position: *position,
            },
            4 + phrase.len(),
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// Dataset on disk
// ---------------------------------------------------------------------------------------------
