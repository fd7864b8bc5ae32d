"""Query → facts above a threshold, at most k, each with its score: dense, lexical or hybrid.

Why not a raw cosine threshold: multilingual-e5 puts almost every pair between 0.75 and 0.9, a question
key (query-to-query) scores higher than a fact text (query-to-passage) for the same match, and some
queries sit close to everything. A threshold on raw cosine therefore moves with the model, the persona,
the query and the key kind. Scores here are *calibrated*:

1. **Background z-score.** Each query is also compared with a fixed background of unrelated text
   (`BACKGROUND_PASSAGES` for fact texts, `BACKGROUND_QUERIES` for a fact's own questions, which are
   query-like). A key's cosine becomes ``z = (cos - mean_bg) / std_bg``: how far above an unrelated
   sentence it stands *for this query*. The unit is the same for every model and query.
2. **Relative to the best.** ``gap = z - max z`` over the facts for this query: a fact far below the
   best match is a weaker candidate than its z alone says (the "top-3 always" failure).
3. **Lexical coverage** (hybrid): BM25 over Sudachi content words, divided by the query's own maximum,
   i.e. the IDF-weighted share of the query's words that the key contains, in [0, 1] on any corpus.
4. A logistic combination per key kind, ``logit = bias + w_z z + w_gap gap + w_lex lex``, whose weights
   (`CALIBRATION`) were fitted once on the ojousama dev split; the score is ``sigmoid(max over key
   kinds)``, a relevance probability in (0, 1). A fact's score is its best key's (text or question).

The default thresholds (`DEFAULT_THRESHOLDS`) were tuned on the ojousama dev split *with the facts'
questions hidden*, i.e. for a persona in the minimal ``{"id", "text"}`` form, because that is what a
user brings; ``tune-threshold`` refines them per index. ``lexical`` mode scores by coverage alone.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.facts import Fact
from rag_persona.retrieval.store import KEY_QUESTION, FactStore

MODES = ("dense", "lexical", "hybrid")
DEFAULT_MODE = "hybrid"
DEFAULT_K = 3
# Exact scoring against every key up to this many rows; FAISS top candidates above it.
EXACT_LIMIT = 20_000


@dataclass(frozen=True)
class Calibration:
    """logit = bias + w_z * z + w_gap * (z - best z for the query) + w_lex * lexical coverage."""

    bias: float
    w_z: float
    w_gap: float
    w_lex: float = 0.0

    def logit(self, z: np.ndarray, gap: np.ndarray, lex: np.ndarray) -> np.ndarray:
        return self.bias + self.w_z * z + self.w_gap * gap + self.w_lex * lex


# Fitted by `rag_persona.retrieval.tuning.fit_calibration` (L2 = 1) on the ojousama index and
# knowledge/ojousama/queries/dev.jsonl; bench/retrieval.py --calibrate refits and prints them.
CALIBRATION: dict[tuple[str, str], Calibration] = {
    ("dense", "text"): Calibration(bias=-6.036, w_z=1.484, w_gap=1.338),
    ("dense", "question"): Calibration(bias=-5.531, w_z=1.05, w_gap=1.717),
    ("hybrid", "text"): Calibration(bias=-5.763, w_z=1.338, w_gap=1.368, w_lex=1.868),
    ("hybrid", "question"): Calibration(bias=-5.288, w_z=0.919, w_gap=1.709, w_lex=1.74),
}
# F1-optimal on the ojousama dev split with every fact's questions removed (a minimal-form persona),
# k = DEFAULT_K; the middle of the near-best plateau. tune-threshold refines them per index.
DEFAULT_THRESHOLDS: dict[str, float] = {"dense": 0.24, "hybrid": 0.19, "lexical": 0.28}

# Unrelated text for the background z-score: general knowledge, news, tasks, other people's lives.
# Written once, independently of any persona's facts or queries; the same for every index.
BACKGROUND_PASSAGES = (
    "富士山は標高3776メートルで、日本で最も高い山である。",
    "光の速さは秒速およそ30万キロメートルだ。",
    "東京駅は1914年に開業した。",
    "水は摂氏100度で沸騰する。",
    "明日は全国的に晴れるが、夕方から北日本で雨が降る見込み。",
    "日経平均株価は前日比で200円値上がりした。",
    "新しい図書館は駅前に来年の春に開館する予定です。",
    "サッカーの試合は延長戦の末に引き分けとなった。",
    "この料理は鶏肉と玉ねぎを甘辛く煮込んだものです。",
    "パソコンの電源が入らないときはバッテリーを確認してください。",
    "太陽系には八つの惑星がある。",
    "江戸幕府は1603年に徳川家康によって開かれた。",
    "ペンギンは空を飛べないが、泳ぐのが得意な鳥だ。",
    "電車の遅延により、会議の開始を三十分遅らせます。",
    "円周率はおよそ3.14159である。",
    "この川は県の北部を流れ、やがて太平洋に注ぐ。",
    "彼は毎朝五時に起きてジョギングをしている。",
    "私の姉は大阪の銀行で働いています。",
    "父は釣りが趣味で、週末になると海へ出かける。",
    "祖母の家の庭には大きな柿の木がある。",
    "友人は先月、北海道に引っ越した。",
    "彼女はピアノ教室で子どもたちに教えている。",
    "兄はラーメンが大好きで、週に三回は食べる。",
    "その作家は三十歳でデビューし、多くの賞を受けた。",
    "鉄は湿気の多い場所に置くと錆びやすい。",
    "インフルエンザの予防には手洗いとうがいが有効です。",
    "この商品は送料無料で、三日以内に届きます。",
    "会員登録にはメールアドレスとパスワードが必要です。",
    "京都には千年以上の歴史を持つ寺社が数多くある。",
    "光合成によって植物は二酸化炭素から糖をつくる。",
    "月は約27日かけて地球の周りを一周する。",
    "明治維新によって日本は近代国家への道を歩み始めた。",
    "日本の人口はおよそ一億二千万人である。",
    "フランスの首都はパリで、セーヌ川が流れている。",
    "カレーライスは日本の家庭料理として定着している。",
    "ネコは一日の大半を眠って過ごす。",
    "この町では毎年夏に花火大会が開かれる。",
    "新型のスマートフォンはカメラ性能が大きく向上した。",
    "昨夜の地震による津波の心配はありません。",
    "選挙の投票率は前回を五ポイント下回った。",
    "コーヒーに含まれるカフェインには覚醒作用がある。",
    "英語の授業では毎週小テストが行われる。",
    "自転車は左側通行が原則です。",
    "その映画は公開初日に十万人を動員した。",
    "桜の開花は例年より一週間早かった。",
    "会議室の予約は前日までにお願いします。",
    "この橋は全長二キロメートルで、県内最長である。",
    "ビタミンCはレモンやいちごに多く含まれる。",
    "プログラムのバグを修正し、新しい版を公開した。",
    "冬の北海道では気温が氷点下二十度を下回ることもある。",
    "彼の好きな色は青で、持ち物も青いものが多い。",
    "隣の家の犬はとても人懐っこい。",
    "私は高校時代、吹奏楽部でトランペットを吹いていた。",
    "叔父は長野でりんご農家を営んでいる。",
    "その歌手の新曲は配信ランキングで一位になった。",
    "野球の試合は雨のため中止になった。",
    "古代エジプトではピラミッドが王の墓として築かれた。",
    "電気自動車の普及に向けて充電設備の整備が進んでいる。",
    "ここから駅までは歩いて十分ほどです。",
    "この薬は食後に一錠ずつ服用してください。",
    "パンダは主に竹を食べて暮らしている。",
    "恐竜は約六千六百万年前に絶滅したと考えられている。",
    "日本の国会は衆議院と参議院からなる。",
    "渋滞のため、高速道路は二十キロにわたって混雑している。",
    "和紙は楮などの植物の繊維から作られる。",
    "彼女は毎晩寝る前に日記を書いている。",
    "弟はゲームが得意で、大会で優勝したこともある。",
    "母は料理が上手で、特に煮物がおいしい。",
    "先生は生徒に宿題を来週までに出すよう伝えた。",
    "この時計はスイス製で、五十年前から動き続けている。",
    "海水には約3.5パーセントの塩分が含まれている。",
    "人間の体の約六割は水でできている。",
    "アマゾン川は世界最大の流域面積を持つ川である。",
    "このホテルの朝食はバイキング形式です。",
    "台風十号は今夜遅くに九州へ上陸する見通しだ。",
    "数学の問題を解くには、まず条件を整理することが大切だ。",
    "その城は戦国時代に築かれ、現在は公園になっている。",
    "図書館では静かにしてください。",
    "今月の売り上げは目標を一割上回った。",
    "チーズは牛乳を発酵させて作られる。",
    "彼は三か国語を話すことができる。",
    "私の誕生日は十月で、毎年家族でケーキを食べる。",
    "その少年は夏休みに昆虫採集をした。",
    "新宿駅は一日の乗降客数が世界で最も多い駅とされる。",
    "俳句は五・七・五の十七音からなる短い詩である。",
    "ワインはぶどうの果汁を発酵させた酒である。",
    "この地域では古くから絹織物が盛んである。",
    "火山の噴火に備えて避難経路を確認しておこう。",
    "チェスは二人で対戦する盤上のゲームである。",
    "スキー場は十二月中旬にオープンする。",
    "郵便局の窓口は午後五時に閉まります。",
    "祖父は若いころ船乗りとして世界中を旅した。",
    "友達と一緒に映画を見に行く約束をした。",
    "健康のために毎日野菜を食べるようにしている。",
    "この庭園は四季折々の花が楽しめることで知られる。",
    "ロボット掃除機は部屋の形を学習して効率よく掃除する。",
    "その選手はオリンピックで金メダルを獲得した。",
    "紅葉の見ごろは十一月下旬です。",
    "大学の入学試験は二月に行われる。",
    "宇宙飛行士は国際宇宙ステーションに半年間滞在した。",
)

BACKGROUND_QUERIES = (
    "日本で一番高い山は？",
    "光の速さはどれくらいですか？",
    "明日の天気を教えて",
    "今日の株価はどうなっていますか",
    "円周率は？",
    "フランスの首都はどこ？",
    "水が沸騰する温度は何度？",
    "Pythonでファイルを読み込むにはどうすればいい？",
    "英語で「ありがとう」は何と言いますか",
    "おすすめの映画を教えてください",
    "近くのコンビニはどこですか",
    "1たす1は？",
    "江戸幕府を開いたのは誰？",
    "インフルエンザの症状は？",
    "地球から月までの距離は？",
    "この文章を英訳してください",
    "カレーの作り方を教えて",
    "パンダは何を食べるの？",
    "選挙はいつ行われますか",
    "東京から大阪まで新幹線で何時間？",
    "恐竜はなぜ絶滅したの？",
    "電気自動車のメリットは？",
    "ピラミッドは誰が作ったの？",
    "体にいい食べ物は？",
    "台風はどうやってできるの？",
    "今何時？",
    "消費税は何パーセントですか",
    "おすすめのスマホは？",
    "太陽系で一番大きい惑星は？",
    "アメリカの大統領は誰？",
    "宿題を手伝ってくれる？",
    "ワインとビールの違いは？",
    "昨日の野球の結果は？",
    "俳句の作り方を教えて",
    "光合成とは何ですか",
    "人口が一番多い国は？",
    "この薬はいつ飲めばいいですか",
    "駅までの道を教えて",
    "地震が起きたらどうすればいい？",
    "おいしいラーメン屋を知ってる？",
    "パスワードを忘れたらどうする？",
    "冗談を言って",
    "数学の勉強法は？",
    "チェスのルールを教えて",
    "宇宙はどのくらい広いの？",
    "ビタミンCが多い果物は？",
    "明治維新はいつ？",
    "人間の体で一番大きい臓器は？",
    "世界で一番長い川は？",
    "ネコはなぜよく寝るの？",
    "株を買うにはどうすればいい？",
    "来週の予定を確認して",
    "風邪をひいたときの対処法は？",
    "カフェインの効果は？",
    "オリンピックは何年ごとに開かれる？",
    "桜はいつ咲く？",
    "このプログラムのバグを直して",
    "マラソンの距離は何キロ？",
    "日本の国会はいくつの院からなる？",
    "電車が遅れているのはなぜ？",
    "ホテルの予約をお願いします",
    "紅葉の名所はどこ？",
    "大学受験の勉強はいつから始めるべき？",
    "自転車のタイヤの空気の入れ方は？",
    "チーズは何から作られる？",
    "世界一高いビルは？",
    "スキーが上手くなるコツは？",
    "郵便局は何時まで開いていますか",
    "富士山に登るにはどうすればいいですか",
    "ロボット掃除機は便利ですか",
    "北海道の冬はどれくらい寒い？",
    "面白い本を紹介して",
    "海の水はなぜしょっぱいの？",
    "キリンの首はなぜ長い？",
    "会議は何時からですか",
    "量子コンピュータとは？",
    "SNSのアカウントを作るには？",
    "ダイエットの方法を教えて",
    "天気予報は当たりますか",
    "為替レートはいくらですか",
    "この単語の意味は？",
    "東京タワーの高さは？",
    "虹はなぜ七色なの？",
    "AIは人間を超える？",
    "料理のレシピを教えて",
    "ガソリン代はいくら？",
    "税金の申告はいつまで？",
    "今年の流行語は？",
    "京都でおすすめの観光地は？",
    "火山はなぜ噴火するの？",
    "ゲームのおすすめは？",
    "犬を飼うときの注意点は？",
    "速く走るにはどうすればいい？",
    "血液型で性格はわかる？",
    "宇宙飛行士になるには？",
    "化学式H2Oは何？",
    "サッカーのワールドカップの優勝国は？",
    "源氏物語の作者は？",
    "エアコンの温度は何度がいい？",
    "世界の国はいくつある？",
)


# -- Japanese tokens for BM25 ---------------------------------------------------------------------
_CONTENT_POS = {"名詞", "動詞", "形容詞", "形状詞", "副詞", "記号"}
_TOKENIZER_LOCK = threading.Lock()  # a Sudachi tokenizer is not thread-safe
_TOKENIZER = None


def _tokenize(text: str) -> list:
    global _TOKENIZER
    from sudachipy import dictionary
    from sudachipy import tokenizer as sudachi_tokenizer

    with _TOKENIZER_LOCK:
        if _TOKENIZER is None:
            _TOKENIZER = dictionary.Dictionary(dict="core").tokenizer(
                mode=sudachi_tokenizer.Tokenizer.SplitMode.A
            )
        return list(_TOKENIZER.tokenize(text))


def content_tokens(text: str) -> list[str]:
    """Sudachi (mode A) content words in normalised form: nouns, verbs, adjectives, adverbs; no
    particles, auxiliaries, pronouns, prefixes, punctuation or light verbs (する, ある, いる)."""
    out = []
    for m in _tokenize(text):
        pos = m.part_of_speech()
        if pos[0] not in _CONTENT_POS or pos[1] == "非自立可能":
            continue
        if pos[0] == "記号" and not m.surface().isalnum():
            continue
        form = m.normalized_form().lower()
        if form.strip():
            out.append(form)
    return out


class LexicalIndex:
    """BM25 over content tokens of key rows, scored as an IDF-weighted *coverage* of the query in [0, 1].

    Raw BM25 grows with query length and corpus statistics. Dividing by the query's own maximum (every
    query word present once in a key of average length) gives the share of the query's information
    that a key matches: 1.0 means every content word of the query is there, on any corpus.
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        docs = [content_tokens(t) for t in texts]
        self.n = len(docs)
        self.lengths = np.array([len(d) for d in docs], dtype=np.float64)
        mean = float(self.lengths.mean()) if self.n else 0.0
        self.avgdl = mean if mean > 0 else 1.0
        postings: dict[str, dict[int, int]] = {}
        for row, doc in enumerate(docs):
            for tok in doc:
                bucket = postings.setdefault(tok, {})
                bucket[row] = bucket.get(row, 0) + 1
        self.postings = {
            t: (
                np.fromiter(p.keys(), dtype=np.int64, count=len(p)),
                np.fromiter(p.values(), dtype=np.float64),
            )
            for t, p in postings.items()
        }

    def idf(self, term: str) -> float:
        df = len(self.postings[term][0]) if term in self.postings else 0
        return math.log(1.0 + (self.n - df + 0.5) / (df + 0.5))

    def scores(self, query: str) -> np.ndarray:
        """Coverage for every key row (zeros where no query word occurs)."""
        out = np.zeros(self.n, dtype=np.float64)
        terms = list(dict.fromkeys(content_tokens(query)))
        norm = 0.0
        for t in terms:
            idf = self.idf(t)
            norm += idf
            if t not in self.postings:
                continue
            rows, tf = self.postings[t]
            denom = tf + self.k1 * (1 - self.b + self.b * self.lengths[rows] / self.avgdl)
            # 1 for a single occurrence in a key of average length; capped there
            out[rows] += idf * np.minimum(tf * (self.k1 + 1) / denom, 1.0)
        return out / norm if norm > 0 else out


# -- configuration and results --------------------------------------------------------------------
@dataclass
class RetrievalConfig:
    """mode: dense | lexical | hybrid; threshold: None = the index's tuned value, else the default."""

    mode: str = DEFAULT_MODE
    threshold: float | None = None
    k: int = DEFAULT_K
    use_questions: bool = True
    candidates: int = 256

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RagPersonaError(f"retrieval: field 'mode': {self.mode!r} is not one of {', '.join(MODES)}")
        if int(self.k) < 1:
            raise RagPersonaError(f"retrieval: field 'k': must be at least 1, got {self.k}")
        if self.threshold is not None and not math.isfinite(float(self.threshold)):
            raise RagPersonaError(f"retrieval: field 'threshold': not a number ({self.threshold})")


@dataclass
class Hit:
    """A retrieved fact with its calibrated score (and the raw evidence behind it)."""

    fact_id: str
    text: str
    score: float
    cosine: float | None = None
    lexical: float | None = None
    fact: Fact | None = field(default=None, repr=False, compare=False)

    @property
    def id(self) -> str:
        return self.fact_id

    def to_dict(self) -> dict:
        return {"id": self.fact_id, "text": self.text, "score": round(float(self.score), 4)}


@dataclass
class Candidates:
    """Per query: candidate facts and their evidence, the input to the calibrated score."""

    facts: np.ndarray  # fact indices
    cos: np.ndarray  # best cosine over the fact's keys (nan in lexical mode)
    z_text: np.ndarray  # background z of the text key
    z_question: np.ndarray  # best background z over question keys (-inf: none)
    lex_text: np.ndarray  # lexical coverage of the text key
    lex_question: np.ndarray  # best coverage over question keys (0: none)


def _empty() -> Candidates:
    e = np.zeros(0)
    return Candidates(np.zeros(0, dtype=np.int64), e, e, e, e, e)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


_BACKGROUND: dict[str, tuple[np.ndarray, np.ndarray]] = {}
_BACKGROUND_LOCK = threading.Lock()


def background_vectors(embedder) -> tuple[np.ndarray, np.ndarray]:
    """(passages, queries) background embeddings for an embedder, computed once per process."""
    with _BACKGROUND_LOCK:
        key = f"{embedder.name}:{embedder.dim}"
        if key not in _BACKGROUND:
            _BACKGROUND[key] = (
                embedder.encode_passages(list(BACKGROUND_PASSAGES)),
                embedder.encode_queries(list(BACKGROUND_QUERIES)),
            )
        return _BACKGROUND[key]


def default_threshold(mode: str) -> float:
    return DEFAULT_THRESHOLDS[mode]


class Retriever:
    """Thresholded, capped retrieval over a `FactStore`; `search` returns hits sorted by score."""

    def __init__(self, store: FactStore, config: RetrievalConfig | None = None):
        self.store = store
        self.config = config or RetrievalConfig()
        if self.config.threshold is not None:
            self.threshold_source = "explicit"
        elif store.tuned_threshold(self.config.mode) is not None:
            self.config.threshold = float(store.tuned_threshold(self.config.mode))
            self.threshold_source = "tuned"
        else:
            self.config.threshold = default_threshold(self.config.mode)
            self.threshold_source = "default"
        self._lexical: LexicalIndex | None = None
        self._lock = threading.Lock()
        counts = np.bincount(store.key_fact, minlength=len(store.facts)) if len(store.facts) else np.zeros(0)
        self._fact_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    # -- convenience accessors -------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def threshold(self) -> float:
        return float(self.config.threshold)

    @property
    def k(self) -> int:
        return int(self.config.k)

    @property
    def lexical_index(self) -> LexicalIndex:
        with self._lock:
            if self._lexical is None:
                texts = [t for f in self.store.facts for t in f.keys()]
                self._lexical = LexicalIndex(texts)
            return self._lexical

    # -- search ----------------------------------------------------------------------------------
    def search(self, query: str, *, threshold: float | None = None, k: int | None = None) -> list[Hit]:
        """Facts scoring at least the threshold, best first, at most k."""
        return self.search_many([query], threshold=threshold, k=k)[0]

    def search_many(
        self, queries: Sequence[str], *, threshold: float | None = None, k: int | None = None
    ) -> list[list[Hit]]:
        t = self.threshold if threshold is None else float(threshold)
        k = self.k if k is None else int(k)
        out = []
        for cands in self.candidates(queries):
            scores = self.score(cands)
            hits = []
            for i in np.argsort(-scores, kind="stable")[:k]:
                if scores[i] < t:
                    break
                fact = self.store.facts[int(cands.facts[i])]
                cos = cands.cos[i]
                hits.append(
                    Hit(
                        fact.id,
                        fact.text,
                        float(scores[i]),
                        cosine=None if np.isnan(cos) else float(cos),
                        lexical=float(max(cands.lex_text[i], cands.lex_question[i])),
                        fact=fact,
                    )
                )
            out.append(hits)
        return out

    def rank(self, queries: Sequence[str], depth: int | None = None) -> list[list[tuple[int, float]]]:
        """Per query, (fact index, calibrated score) for candidate facts, best first, no threshold."""
        rankings = []
        for cands in self.candidates(queries):
            scores = self.score(cands)
            order = np.argsort(-scores, kind="stable")
            if depth is not None:
                order = order[:depth]
            rankings.append([(int(cands.facts[i]), float(scores[i])) for i in order])
        return rankings

    def rankings(self, queries: Sequence[str], depth: int = 20) -> list[list[tuple[str, float]]]:
        """Per query, (fact id, score) best first: the input of threshold sweeps."""
        ids = self.store.ids
        return [[(ids[f], s) for f, s in r] for r in self.rank(queries, depth)]

    def score(self, cands: Candidates) -> np.ndarray:
        """Calibrated scores for one query's candidates."""
        if self.mode == "lexical":
            return np.maximum(cands.lex_text, cands.lex_question)
        return score_candidates(cands, self.mode)

    # -- evidence --------------------------------------------------------------------------------
    def candidates(self, queries: Sequence[str]) -> list[Candidates]:
        """Candidate facts and their raw evidence for each query."""
        queries = list(queries)
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise RagPersonaError("search: field 'query': empty")
        if len(self.store.facts) == 0:
            return [_empty() for _ in queries]
        if self.mode == "lexical":
            return [self._lexical_candidates(q) for q in queries]
        return self._dense_candidates(queries)

    def _key_rows(self, facts: np.ndarray) -> np.ndarray:
        """All key rows of the given facts (keys of one fact are contiguous)."""
        if len(facts) == len(self.store.facts):
            return np.arange(self.store.n_keys, dtype=np.int64)
        starts, ends = self._fact_start[facts], self._fact_start[facts + 1]
        lens = ends - starts
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
        return (np.repeat(starts - offsets, lens) + np.arange(int(lens.sum()))).astype(np.int64)

    def _lexical_candidates(self, query: str) -> Candidates:
        store = self.store
        lex = self.lexical_index.scores(query)
        rows = np.flatnonzero(lex > 0)
        if len(rows) > 4 * self.config.candidates:
            rows = rows[np.argsort(-lex[rows])[: 4 * self.config.candidates]]
        facts = np.unique(store.key_fact[rows]) if len(rows) else np.zeros(0, dtype=np.int64)
        lt, lq = self._per_fact(facts, lex, lex)
        n = len(facts)
        nan = np.full(n, np.nan)
        return Candidates(facts, nan, nan, np.full(n, -np.inf), lt, lq)

    def _per_fact(self, facts: np.ndarray, text_vals: np.ndarray, q_vals: np.ndarray, fill: float = 0.0):
        """(value of the text key, best value over question keys) per fact from per-row arrays."""
        store = self.store
        text = text_vals[self._fact_start[facts]] if len(facts) else np.zeros(0)
        best_q = np.full(len(facts), fill, dtype=np.float64)
        if len(facts) and self.config.use_questions:
            rows = self._key_rows(facts)
            qmask = store.key_kind[rows] == KEY_QUESTION
            if qmask.any():
                pos = np.searchsorted(facts, store.key_fact[rows[qmask]])
                np.maximum.at(best_q, pos, q_vals[rows[qmask]])
        return np.asarray(text, dtype=np.float64), best_q

    def _dense_candidates(self, queries: list[str]) -> list[Candidates]:
        store = self.store
        emb = store.embedder
        qv = emb.encode_queries(queries)
        bp, bq = background_vectors(emb)
        sp, sq = qv @ bp.T, qv @ bq.T
        mu_p, sd_p = sp.mean(1), np.maximum(sp.std(1), 1e-6)
        mu_q, sd_q = sq.mean(1), np.maximum(sq.std(1), 1e-6)
        vectors = store.vectors
        exact = store.n_keys <= EXACT_LIMIT
        if exact:
            all_cos = qv @ vectors.T if store.n_keys else np.zeros((len(queries), 0), dtype=np.float32)
        else:
            _, found = store.index.search(np.ascontiguousarray(qv), min(self.config.candidates, store.n_keys))
        hybrid = self.mode == "hybrid"
        out = []
        for i, query in enumerate(queries):
            lex = self.lexical_index.scores(query) if hybrid else None
            if exact:
                facts = np.arange(len(store.facts), dtype=np.int64)
                cos_rows = all_cos[i].astype(np.float64)
            else:
                rows = found[i][found[i] >= 0]
                if hybrid:
                    hits = np.flatnonzero(lex > 0)
                    if len(hits):
                        rows = np.concatenate([rows, hits[np.argsort(-lex[hits])[: self.config.candidates]]])
                facts = np.unique(store.key_fact[rows])
                key_rows = self._key_rows(facts)
                cos_rows = np.full(store.n_keys, np.nan)
                cos_rows[key_rows] = vectors[key_rows] @ qv[i]
            z_p = (cos_rows - mu_p[i]) / sd_p[i]
            z_q = (cos_rows - mu_q[i]) / sd_q[i]
            zt, zq = self._per_fact(facts, z_p, z_q, fill=-np.inf)
            ct, cq = self._per_fact(facts, cos_rows, cos_rows, fill=-np.inf)
            if hybrid:
                lt, lq = self._per_fact(facts, lex, lex)
            else:
                lt, lq = np.zeros(len(facts)), np.zeros(len(facts))
            out.append(Candidates(facts, np.maximum(ct, cq), zt, zq, lt, lq))
        return out


def score_candidates(cands: Candidates, mode: str, calibration: dict | None = None) -> np.ndarray:
    """sigmoid(max(text logit, question logit)) for one query's candidates."""
    cal = calibration or CALIBRATION
    if len(cands.facts) == 0:
        return np.zeros(0)
    zt, zq = cands.z_text, cands.z_question
    gap_t = zt - zt.max()
    has_q = np.isfinite(zq)
    logit = cal[(mode, "text")].logit(zt, gap_t, cands.lex_text)
    if has_q.any():
        gap_q = np.where(has_q, zq - zq[has_q].max(), 0.0)
        lq = cal[(mode, "question")].logit(np.where(has_q, zq, 0.0), gap_q, cands.lex_question)
        logit = np.where(has_q, np.maximum(logit, lq), logit)
    return _sigmoid(logit)


def retriever_for(
    store: FactStore, mode: str | None = None, threshold: float | None = None, k: int | None = None
) -> Retriever:
    """A retriever with the index's defaults (stored mode and k, tuned threshold) unless overridden."""
    stored = store.manifest.get("retrieval") or {}
    config = RetrievalConfig(
        mode=mode or stored.get("mode") or DEFAULT_MODE,
        threshold=threshold,
        k=int(k or stored.get("k") or DEFAULT_K),
    )
    return Retriever(store, config)


# -- LangChain ------------------------------------------------------------------------------------
def langchain_retriever(retriever: Retriever):
    """A `langchain_core` BaseRetriever over ours: Documents with metadata id and score."""
    return PersonaLangChainRetriever(retriever=retriever)


try:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from pydantic import ConfigDict

    class PersonaLangChainRetriever(BaseRetriever):
        """LangChain adapter: `invoke(query)` returns thresholded Documents, best first."""

        model_config = ConfigDict(arbitrary_types_allowed=True)
        retriever: Any

        def _get_relevant_documents(
            self, query: str, *, run_manager: CallbackManagerForRetrieverRun
        ) -> list[Document]:
            return [
                Document(
                    page_content=h.text,
                    metadata={"id": h.fact_id, "score": h.score, "cosine": h.cosine, "lexical": h.lexical},
                )
                for h in self.retriever.search(query)
            ]

except ImportError:  # pragma: no cover - langchain-core is a declared dependency

    class PersonaLangChainRetriever:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise RagPersonaError("langchain-core is not installed: pip install langchain-core")
