//! Sentence splitting for speech synthesis.
//!
//! TTS backends are slower and less stable on long inputs, and a listener wants the first
//! sentence before the last is synthesized, so text is cut at sentence ends and long sentences
//! are cut again at the last comma or space that keeps a piece under the limit.

/// Splits `text` into trimmed pieces of at most `max_chars` characters, in order.
pub fn split_sentences(text: &str, max_chars: usize) -> Vec<String> {
    let max_chars = max_chars.max(1);
    let mut pieces = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        current.push(c);
        let at_end = match c {
            '.' | '!' | '?' | ';' => chars.peek().is_none_or(|n| n.is_whitespace()),
            '。' | '！' | '？' | '\n' => true,
            _ => false,
        };
        if at_end {
            push_piece(&mut pieces, &current, max_chars);
            current.clear();
        }
    }
    push_piece(&mut pieces, &current, max_chars);
    pieces
}

fn push_piece(pieces: &mut Vec<String>, piece: &str, max_chars: usize) {
    let mut rest = piece.trim();
    while rest.chars().count() > max_chars {
        let limit = rest
            .char_indices()
            .nth(max_chars)
            .map_or(rest.len(), |(i, _)| i);
        let head = &rest[..limit];
        // Prefer a clause break, then a word break; a single giant word is cut where it must be.
        let cut = head
            .rfind([',', ':'])
            .map(|i| i + 1)
            .or_else(|| head.rfind(char::is_whitespace))
            .filter(|&i| i > 0)
            .unwrap_or(limit);
        let (first, second) = rest.split_at(cut);
        if !first.trim().is_empty() {
            pieces.push(first.trim().to_string());
        }
        rest = second.trim();
    }
    if !rest.is_empty() {
        pieces.push(rest.to_string());
    }
}

/// Collects streamed text (LLM deltas) and hands out each sentence as soon as it is complete,
/// so speech for the first sentence can start while the rest is still being generated.
///
/// A sentence is complete at `.`, `!`, `?` or `;` followed by whitespace (so "2.5" is not cut),
/// at CJK sentence marks, or at a newline; pieces longer than `max_chars` are cut as
/// [`split_sentences`] cuts them.
#[derive(Debug, Clone)]
pub struct SentenceBuffer {
    pending: String,
    max_chars: usize,
}

impl SentenceBuffer {
    /// A buffer whose sentences are at most `max_chars` long.
    pub fn new(max_chars: usize) -> Self {
        Self {
            pending: String::new(),
            max_chars: max_chars.max(1),
        }
    }

    /// Adds a delta; returns the sentences it completed, in order.
    pub fn push(&mut self, delta: &str) -> Vec<String> {
        self.pending.push_str(delta);
        // Everything up to the last sentence end that is followed by more text is final.
        let mut cut = None;
        let mut chars = self.pending.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            let next = chars.peek().map(|&(_, n)| n);
            let ends = match c {
                '.' | '!' | '?' | ';' => next.is_some_and(char::is_whitespace),
                '。' | '！' | '？' | '\n' => true,
                _ => false,
            };
            if ends {
                cut = Some(i + c.len_utf8());
            }
        }
        let mut out = match cut {
            Some(end) => {
                let done: String = self.pending.drain(..end).collect();
                split_sentences(&done, self.max_chars)
            }
            None => Vec::new(),
        };
        // A run-on sentence is spoken in pieces rather than held back indefinitely.
        while self.pending.chars().count() > self.max_chars {
            let limit = self
                .pending
                .char_indices()
                .nth(self.max_chars)
                .map_or(self.pending.len(), |(i, _)| i);
            let head = &self.pending[..limit];
            let cut = head
                .rfind([',', ':'])
                .map(|i| i + 1)
                .or_else(|| head.rfind(char::is_whitespace))
                .filter(|&i| i > 0)
                .unwrap_or(limit);
            let piece = self.pending[..cut].trim().to_string();
            self.pending = self.pending[cut..].trim_start().to_string();
            if !piece.is_empty() {
                out.push(piece);
            }
        }
        out
    }

    /// The end of the text: whatever is left, as sentences.
    pub fn finish(&mut self) -> Vec<String> {
        let rest = std::mem::take(&mut self.pending);
        split_sentences(&rest, self.max_chars)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_deltas_release_sentences_as_soon_as_they_end() {
        let mut b = SentenceBuffer::new(200);
        assert!(b.push("Hello").is_empty());
        assert!(
            b.push(" there.").is_empty(),
            "the end of a sentence needs the next character"
        );
        assert_eq!(b.push(" Version 2"), ["Hello there."]);
        assert!(
            b.push(".5 is out").is_empty(),
            "a decimal point is not a sentence end"
        );
        assert_eq!(b.push("! And"), ["Version 2.5 is out!"]);
        assert!(b.push(" more").is_empty());
        assert_eq!(b.finish(), ["And more"]);
        assert!(b.finish().is_empty());
    }

    #[test]
    fn run_on_text_is_released_in_pieces() {
        let mut b = SentenceBuffer::new(20);
        let mut out = Vec::new();
        for word in "one two three four five six seven eight nine ten".split_inclusive(' ') {
            out.extend(b.push(word));
        }
        assert!(
            !out.is_empty(),
            "nothing released from a long run-on sentence"
        );
        out.extend(b.finish());
        assert!(out.iter().all(|p| p.chars().count() <= 20), "{out:?}");
        assert_eq!(
            out.join(" "),
            "one two three four five six seven eight nine ten"
        );
    }

    #[test]
    fn splits_at_sentence_ends_and_keeps_order() {
        let s = split_sentences("Hello there. How are you? Fine! Version 2.5 is out.", 100);
        assert_eq!(
            s,
            [
                "Hello there.",
                "How are you?",
                "Fine!",
                "Version 2.5 is out."
            ]
        );
    }

    #[test]
    fn long_sentences_are_cut_at_commas_or_spaces_under_the_limit() {
        let s = split_sentences("one two three, four five six seven eight", 16);
        assert!(s.iter().all(|p| p.chars().count() <= 16), "{s:?}");
        assert_eq!(s.join(" "), "one two three, four five six seven eight");
        let giant = "x".repeat(25);
        assert_eq!(split_sentences(&giant, 10).len(), 3);
    }

    #[test]
    fn blank_text_gives_nothing() {
        assert!(split_sentences("  \n ", 10).is_empty());
    }
}
