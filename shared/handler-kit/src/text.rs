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

#[cfg(test)]
mod tests {
    use super::*;

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
