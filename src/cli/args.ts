/**
 * Command-line parsing shared by the commands: qemu-img style sizes ("64M", "1.5G", "4096") and
 * `-o key=value,key=value` option lists.
 */
import { CodedError } from '../io/errors.js';

const SUFFIXES: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/** Parse a size with an optional binary suffix (K, M, G, T, P, E; case-insensitive) into bytes. */
export function parseSize(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([bkmgtpe]?)(?:i?b)?$/i.exec(text.trim());
  if (!m) throw new CodedError('EINVAL', `invalid size '${text}'`);
  const bytes = Math.round(Number(m[1]) * SUFFIXES[m[2].toLowerCase()]);
  if (!Number.isSafeInteger(bytes)) throw new CodedError('EINVAL', `size '${text}' is too large`);
  return bytes;
}

/** Parse "a=1,b=2,flag" into a map (a bare key means "on"); commas can be escaped by doubling, as in qemu. */
export function parseOptionList(text: string): Map<string, string> {
  const options = new Map<string, string>();
  for (const part of text.replace(/,,/g, '\u0000').split(',')) {
    if (part === '') continue;
    const item = part.replace(/\u0000/g, ',');
    const eq = item.indexOf('=');
    if (eq < 0) options.set(item, 'on');
    else options.set(item.slice(0, eq), item.slice(eq + 1));
  }
  return options;
}

/** qemu's boolean option values. */
export function parseBool(name: string, value: string): boolean {
  if (['on', 'yes', 'true'].includes(value)) return true;
  if (['off', 'no', 'false'].includes(value)) return false;
  throw new CodedError('EINVAL', `parameter '${name}' expects 'on' or 'off', got '${value}'`);
}

export interface ParsedArgs {
  /** Flags and their values (repeatable ones keep the last; -o values are joined with commas). */
  flags: Map<string, string>;
  positional: string[];
}

/**
 * Minimal getopt: `valueFlags` take a value (-o VALUE, -oVALUE, --output=VALUE, --output VALUE),
 * `boolFlags` do not. Unknown flags are an error.
 */
export function parseArgs(argv: string[], valueFlags: string[], boolFlags: string[]): ParsedArgs {
  const flags = new Map<string, string>();
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') { positional.push(...argv.slice(i + 1)); break; }
    if (!arg.startsWith('-') || arg === '-') { positional.push(arg); continue; }
    let name = arg;
    let value: string | undefined;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0) { name = arg.slice(0, eq); value = arg.slice(eq + 1); }
    else if (!arg.startsWith('--') && arg.length > 2 && valueFlags.includes(arg.slice(0, 2))) { name = arg.slice(0, 2); value = arg.slice(2); }
    if (valueFlags.includes(name)) {
      if (value === undefined) {
        value = argv[++i];
        if (value === undefined) throw new CodedError('EINVAL', `option ${name} needs a value`);
      }
      flags.set(name, name === '-o' && flags.has('-o') ? `${flags.get('-o')!},${value}` : value);
    } else if (boolFlags.includes(name)) {
      flags.set(name, 'on');
    } else {
      throw new CodedError('EINVAL', `unknown option '${arg}'`);
    }
  }
  return { flags, positional };
}
