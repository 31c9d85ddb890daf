/**
 * Text for a terminal. Stored text (a deployment's name, a transition's reason, an event id, a job's failed reason)
 * is whatever a producer sent: written raw, its escape sequences would clear the screen, move the cursor, retitle
 * the window or forge lines, and bidi overrides would show it in another order than it reads.
 */

/**
 * C0 controls (ESC, CR, LF, BEL, ...), DEL, C1 controls (U+0080-U+009F: 8-bit CSI and friends), and the bidi
 * embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069).
 */
// eslint-disable-next-line no-control-regex -- matching control characters is the point
const UNPRINTABLE = /[\u0000-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/g;
// eslint-disable-next-line no-control-regex -- as above
const UNPRINTABLE_BUT_NEWLINE = /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/g;

const SHORT: Readonly<Record<string, string>> = { '\n': '\\n', '\r': '\\r', '\t': '\\t' };

function escape(c: string): string {
  return SHORT[c] ?? `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`;
}

/**
 * `text` with every control character and bidi override written as a visible escape: `\n`, `\r`, `\t`, else
 * `\uXXXX`. Those are JSON's own escapes, so JSON text stays JSON (and reads back to the same value).
 * `keepNewlines` leaves line breaks as they are: only for text whose line breaks are the caller's own (pretty-printed
 * JSON, a stack trace, the demo's narration), never for a stored value, whose line break would forge a line.
 */
export function printable(text: string, options: { readonly keepNewlines?: boolean } = {}): string {
  return text.replace(options.keepNewlines === true ? UNPRINTABLE_BUT_NEWLINE : UNPRINTABLE, escape);
}
